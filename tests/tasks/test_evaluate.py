"""Scoring helpers: hand-checked metrics with a -1 positive class, score columns and PNG plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from tasks.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    positive_scores,
    pr_curve_png,
    roc_curve_png,
)
from tasks.gate import METRICS

PHISHING, LEGITIMATE = -1, 1

# Four phishing (-1, the positive class) then four legitimate rows.
Y_TRUE = np.array([-1, -1, -1, -1, 1, 1, 1, 1])
Y_PRED = np.array([-1, -1, -1, 1, -1, -1, 1, 1])
SCORES = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05])


def test_metrics_by_hand_with_minus_one_positive() -> None:
    # Positive = -1. TP = 3 (rows 0-2), FN = 1 (row 3), FP = 2 (rows 4-5), TN = 2 (rows 6-7).
    #   accuracy  = (3 + 2) / 8          = 0.625
    #   precision = TP / (TP + FP) = 3/5 = 0.6    (pos_label=1 would give 2/3)
    #   recall    = TP / (TP + FN) = 3/4 = 0.75   (pos_label=1 would give 1/2)
    #   f1        = 2 * 0.6 * 0.75 / (0.6 + 0.75) = 2/3
    # roc_auc: of the 16 (phishing, legitimate) pairs only (0.3, 0.6) is misordered -> 15/16.
    # pr_auc: ranked by score P P P N P N N N; precision at each positive 1, 1, 1, 4/5 -> 3.8/4 = 0.95.
    metrics = classification_metrics(Y_TRUE, Y_PRED, SCORES, PHISHING)

    assert list(metrics) == list(METRICS)
    assert all(type(value) is float for value in metrics.values())
    assert metrics == pytest.approx(
        {"accuracy": 0.625, "precision": 0.6, "recall": 0.75, "f1": 2 / 3, "roc_auc": 15 / 16, "pr_auc": 0.95}
    )


def test_metrics_accept_pandas_series() -> None:
    metrics = classification_metrics(pd.Series(Y_TRUE), pd.Series(Y_PRED), pd.Series(SCORES), PHISHING)

    assert metrics["recall"] == pytest.approx(0.75)
    assert metrics["roc_auc"] == pytest.approx(15 / 16)


@pytest.mark.parametrize("only_class", [PHISHING, LEGITIMATE])
def test_single_class_truth_gives_nan_aucs_without_raising(only_class: int) -> None:
    truth = np.full(6, only_class)
    predictions = np.array([-1, 1, -1, 1, -1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an UndefinedMetricWarning would mean the AUCs were attempted
        metrics = classification_metrics(truth, predictions, np.linspace(0.1, 0.9, 6), PHISHING)

    assert math.isnan(metrics["roc_auc"]) and math.isnan(metrics["pr_auc"])
    assert metrics["accuracy"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def phishing_model() -> tuple[object, pd.DataFrame]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    labels = rng.choice([PHISHING, LEGITIMATE], size=200)
    frame = pd.DataFrame({"signal": labels * 1.5 + rng.normal(size=200), "noise": rng.normal(size=200)})
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(frame, labels), frame


def test_positive_scores_pick_the_positive_class_column(phishing_model: tuple) -> None:
    model, frame = phishing_model
    probabilities = model.predict_proba(frame)

    scores = positive_scores(model, frame, PHISHING)

    assert list(model.classes_) == [-1, 1]
    np.testing.assert_allclose(scores, probabilities[:, list(model.classes_).index(-1)])
    # Column 1 (the usual "positive" column) is the wrong one here.
    assert not np.allclose(scores, probabilities[:, 1])
    # A low "signal" means phishing, so phishing rows must score high.
    assert scores[frame["signal"] < -2].min() > 0.5


def test_positive_scores_unknown_class(phishing_model: tuple) -> None:
    model, frame = phishing_model

    with pytest.raises(ValueError, match="positive class 0 is not one of"):
        positive_scores(model, frame, 0)


def _assert_png(body: bytes) -> None:
    assert isinstance(body, bytes)
    assert body.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(body) > 5_000


def test_confusion_matrix_png() -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    _assert_png(confusion_matrix_png(Y_TRUE, Y_PRED, [-1, 1], "challenger v3"))
    assert matplotlib.get_backend().lower() == "agg"
    assert plt.get_fignums() == []


def test_curve_pngs_with_two_models() -> None:
    import matplotlib.pyplot as plt

    curves = {"challenger v3": SCORES, "champion v2": SCORES[::-1].copy()}
    roc = roc_curve_png(Y_TRUE, curves, PHISHING, "ROC on the test split")
    precision_recall = pr_curve_png(Y_TRUE, curves, PHISHING, "Precision-recall on the test split")

    _assert_png(roc)
    _assert_png(precision_recall)
    assert roc != precision_recall
    # A second model draws a second curve, so the image differs from the challenger alone.
    assert roc != roc_curve_png(Y_TRUE, {"challenger v3": SCORES}, PHISHING, "ROC on the test split")
    assert plt.get_fignums() == []
