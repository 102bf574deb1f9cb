"""Scoring on the held-out test split: metrics, positive-class scores and evaluation plots.

The positive class is whatever the dataset spec says (phishing is ``-1``), never assumed
to be ``1``: every metric and curve is computed against ``positive_class`` explicitly.
Plots are rendered to PNG bytes with matplotlib's Agg backend, so they work on headless
workers and can be logged as artifacts without touching the file system.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tasks.gate import METRICS


def classification_metrics(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    positive_scores: Sequence[float] | np.ndarray,
    positive_class: Any,
) -> dict[str, float]:
    """Test metrics of a binary classifier, keyed exactly by ``tasks.gate.METRICS``.

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        positive_scores: Predicted probability of ``positive_class`` for each row.
        positive_class: Label of the class the model detects.

    Returns:
        accuracy, precision, recall, f1 (with ``pos_label=positive_class``), roc_auc and
        pr_auc (average precision), as plain floats. roc_auc and pr_auc are NaN when
        ``y_true`` holds a single class, where they are undefined.
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    truth, predicted = np.asarray(y_true), np.asarray(y_pred)
    scores = np.asarray(positive_scores, dtype=float)
    is_positive = truth == positive_class
    # zero_division=0: a model that never predicts the positive class scores 0, not a warning.
    metrics = {
        "accuracy": float(accuracy_score(truth, predicted)),
        "precision": float(precision_score(truth, predicted, pos_label=positive_class, zero_division=0)),
        "recall": float(recall_score(truth, predicted, pos_label=positive_class, zero_division=0)),
        "f1": float(f1_score(truth, predicted, pos_label=positive_class, zero_division=0)),
    }
    if is_positive.all() or not is_positive.any():
        metrics["roc_auc"] = metrics["pr_auc"] = float("nan")
    else:
        metrics["roc_auc"] = float(roc_auc_score(is_positive, scores))
        metrics["pr_auc"] = float(average_precision_score(is_positive, scores))
    return {name: metrics[name] for name in METRICS}


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (NaN, inf, None, bools, text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are finite numbers (what MLflow and the promotion log can store)."""
    return {name: number for name, value in metrics.items() if (number := finite(value)) is not None}


def positive_scores(model: Any, frame: Any, positive_class: Any) -> np.ndarray:
    """Probability of ``positive_class`` for every row of ``frame``.

    The column is looked up in ``model.classes_`` because predict_proba orders columns by
    sorted label: with labels {-1, 1} the positive class -1 is column 0, not column 1.

    Args:
        model: A fitted classifier or sklearn Pipeline with ``classes_`` and ``predict_proba``.
        frame: The rows to score, as the model expects them.
        positive_class: Label of the class the model detects.

    Returns:
        A float array with one score per row.

    Raises:
        ValueError: ``positive_class`` is not one of the model's classes.
    """
    classes = list(model.classes_)
    matches = [index for index, label in enumerate(classes) if label == positive_class]
    if not matches:
        raise ValueError(f"positive class {positive_class!r} is not one of the model's classes {classes}")
    return np.asarray(model.predict_proba(frame)[:, matches[0]], dtype=float)


def confusion_matrix_png(
    y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray, labels: list, title: str
) -> bytes:
    """A confusion matrix plot.

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        labels: Label order of the rows and columns (all classes, even when one is absent).
        title: Plot title.

    Returns:
        PNG bytes.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 4.5))
    try:
        ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=axes, colorbar=False)
        axes.set_title(title)
        return _png(figure)
    finally:
        plt.close(figure)


def roc_curve_png(
    y_true: Sequence[Any] | np.ndarray, scores_by_model: dict[str, np.ndarray], positive_class: Any, title: str
) -> bytes:
    """ROC curves of several models on the same axes (e.g. challenger and champion).

    Args:
        y_true: True labels.
        scores_by_model: Positive-class scores keyed by the legend name of each model.
        positive_class: Label of the class the model detects.
        title: Plot title.

    Returns:
        PNG bytes.
    """
    from sklearn.metrics import RocCurveDisplay

    return _curves_png(RocCurveDisplay, y_true, scores_by_model, positive_class, title)


def pr_curve_png(
    y_true: Sequence[Any] | np.ndarray, scores_by_model: dict[str, np.ndarray], positive_class: Any, title: str
) -> bytes:
    """Precision-recall curves of several models on the same axes (e.g. challenger and champion).

    Args:
        y_true: True labels.
        scores_by_model: Positive-class scores keyed by the legend name of each model.
        positive_class: Label of the class the model detects.
        title: Plot title.

    Returns:
        PNG bytes.
    """
    from sklearn.metrics import PrecisionRecallDisplay

    return _curves_png(PrecisionRecallDisplay, y_true, scores_by_model, positive_class, title)


def _curves_png(
    display: Any,
    y_true: Sequence[Any] | np.ndarray,
    scores_by_model: dict[str, np.ndarray],
    positive_class: Any,
    title: str,
) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    try:
        for position, (name, scores) in enumerate(scores_by_model.items()):
            display.from_predictions(
                y_true,
                scores,
                pos_label=positive_class,
                name=name,
                ax=axes,
                # One chance line is a reference; one per model would just stack copies.
                plot_chance_level=position == 0,
            )
        axes.set_title(title)
        return _png(figure)
    finally:
        plt.close(figure)


def _pyplot() -> Any:
    import matplotlib

    # Workers are headless: an interactive backend would fail (or open windows) there.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()
