"""Model quality on live traffic: delayed labels joined to the prediction log, against the holdout.

* **Window**: the feedback partitions of the last ``feedback_window_days`` days (by arrival),
  joined with the model's predictions of the last ``lookback_days`` days (a label may
  arrive days after its prediction; see ``tasks.feedback`` for duplicates and unknown ids).
* **Metrics**: per model version (and per shadow version, from the shadow columns of the
  same records), Evidently's ``ClassificationPreset`` on the served labels and ``RocAuc``
  on the served probabilities: accuracy, precision, recall, F1, ROC AUC, and the confusion
  matrix. The report is the same kind as the drift report.
* **Comparison**: each version's live metrics against its holdout metrics, the ``test_*``
  metrics the evaluate step logged to its MLflow training run.
* **Signal**: degraded when a metric of ``max_drop`` fell by at least its amount (defaults:
  ROC AUC by 0.05, accuracy by 5 points); detected when the champion was degraded in
  ``consecutive_checks`` checks in a row. Storm protection (one training run at a time, one
  cooldown shared with drift, idempotent run ids) is not decided here: the signal is a plain
  value for the retrain rule shared with the drift check.
* **Too little truth**: fewer than ``min_labelled_rows`` labelled predictions of the champion
  (or labels of a single class) -> the check is skipped with the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tasks import storage
from tasks.dataset_spec import PROJECT_ROOT, DatasetSpec
from tasks.feedback import TRUE_LABEL, JoinCounts, days_ending, labelled_window

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

QUALITY_CONFIG = PROJECT_ROOT / "include" / "quality.yaml"
COMPARED_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
SERVED, SHADOW = "served", "shadow"
# Metric drops are differences of computed floats: a drop of exactly the threshold must count.
_EPSILON = 1e-9


class QualityError(RuntimeError):
    """The check cannot be made (no champion); the message says what to do."""


@dataclass(frozen=True)
class QualityConfig:
    """``include/quality.yaml``; see the file for what each field means."""

    primary_metric: str = "roc_auc"
    max_drop: dict[str, float] = field(default_factory=lambda: {"roc_auc": 0.05, "accuracy": 0.05})
    consecutive_checks: int = 1
    min_labelled_rows: int = 200
    feedback_window_days: int = 1
    lookback_days: int = 7
    monitoring_experiment: str = "network_security_monitoring"

    def __post_init__(self) -> None:
        if self.primary_metric not in COMPARED_METRICS:
            raise ValueError(f"primary_metric must be one of {COMPARED_METRICS}, got {self.primary_metric!r}")
        if not self.max_drop:
            raise ValueError("max_drop must name at least one metric, e.g. {roc_auc: 0.05}")
        for metric, drop in self.max_drop.items():
            if metric not in COMPARED_METRICS:
                raise ValueError(f"max_drop: unknown metric {metric!r}; use {COMPARED_METRICS}")
            if not isinstance(drop, int | float) or not 0 < drop <= 1:
                raise ValueError(f"max_drop.{metric} must be within (0, 1], got {drop!r}")
        for name in ("consecutive_checks", "min_labelled_rows", "feedback_window_days", "lookback_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lookback_days < self.feedback_window_days:
            raise ValueError("lookback_days must cover feedback_window_days (labels come after their predictions)")

    def replace(self, **changes: Any) -> QualityConfig:
        """A copy with the non-None ``changes`` applied (run params override the file)."""
        values = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        return QualityConfig(**values)


def load_quality_config(path: Path = QUALITY_CONFIG) -> QualityConfig:
    """Read ``include/quality.yaml``; unknown keys or bad values fail naming the file."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(raw).__name__}")
    known = set(QualityConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return QualityConfig(**raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


# --- the window ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityWindow:
    """What one check reads.

    Attributes:
        window_end: The check's data interval end (exclusive).
        feedback_days: Arrival days of the labels used (``ds`` partitions), oldest first.
        predictions_from: Oldest prediction-log hour a label may refer to.
    """

    window_end: dt.datetime
    feedback_days: tuple[str, ...]
    predictions_from: dt.datetime

    @property
    def window_start(self) -> dt.datetime:
        """Start of the first feedback day (UTC)."""
        return dt.datetime.fromisoformat(f"{self.feedback_days[0]}T00:00:00+00:00")

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.window_start.isoformat(),
            "end": self.window_end.isoformat(),
            "feedback_days": list(self.feedback_days),
            "predictions_from": self.predictions_from.isoformat(),
        }


def quality_window(window_end: dt.datetime, config: QualityConfig) -> QualityWindow:
    """The feedback days ending with the day of ``window_end`` and the predictions they may label.

    A daily run at midnight reads the day that just ended; a manual run at 13:20 reads today too.
    """
    end = window_end.astimezone(dt.UTC)
    last_day = (end - dt.timedelta(microseconds=1)).date().isoformat()
    return QualityWindow(
        window_end=end,
        feedback_days=tuple(days_ending(last_day, config.feedback_window_days)),
        predictions_from=end - dt.timedelta(days=config.lookback_days),
    )


# --- metrics with Evidently ----------------------------------------------------------------------


def evaluation_frames(joined: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """The labelled rows of each model version: ``(version, served|shadow) -> label, probability, true_label``.

    A shadow candidate's answers ride on the records the baseline served (``shadow_*``), so
    the same labels judge both.
    """
    import pandas as pd

    frames: dict[tuple[str, str], pd.DataFrame] = {}
    columns = ["label", "probability", TRUE_LABEL]
    for version, rows in joined.groupby("model_version", sort=True):
        frames[(str(version), SERVED)] = rows[columns].reset_index(drop=True)
    if "shadow_model_version" in joined.columns:
        shadowed = joined[joined["shadow_model_version"].notna() & joined["shadow_probability"].notna()]
        for version, rows in shadowed.groupby("shadow_model_version", sort=True):
            frames[(str(version), SHADOW)] = pd.DataFrame(
                {
                    "label": rows["shadow_label"].to_numpy(),
                    "probability": rows["shadow_probability"].to_numpy(),
                    TRUE_LABEL: rows[TRUE_LABEL].to_numpy(),
                }
            )
    return frames


def classification_quality(frame: pd.DataFrame, spec: DatasetSpec) -> tuple[Any, dict[str, Any]]:
    """Evidently's classification metrics of served labels and probabilities against the truth.

    Two Evidently classification tasks over the same rows: ``default`` compares the served
    labels with the truth (``ClassificationPreset``: accuracy, precision, recall, F1, the
    rates and the confusion matrix in the report), ``scores`` the served positive-class
    probability (``RocAuc``). Labels go to Evidently as strings: its binary metrics with
    integer labels assume the positive class is 1, and the default dataset's is -1.

    Args:
        frame: ``label`` (served), ``probability`` (of the positive class) and ``true_label``.
        spec: The dataset (positive class).

    Returns:
        The Evidently snapshot (for the HTML) and ``{accuracy, precision, recall, f1, roc_auc,
        tpr, tnr, fpr, fnr, rows, positive_share, confusion_matrix}``; the matrix rows are the
        true classes and its columns the predicted ones, positive class first.

    Raises:
        ValueError: The truth holds a single class (ROC AUC and recall are undefined).
    """
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import RocAuc
    from evidently.presets import ClassificationPreset

    truth = frame[TRUE_LABEL].to_numpy()
    if len(set(truth.tolist())) < 2:
        raise ValueError(f"the {len(frame)} labelled rows hold a single class; ROC AUC and recall are undefined")
    labels = [spec.positive_class, spec.negative_class]
    names = {value: str(value) for value in labels}
    data = frame.assign(
        truth=frame[TRUE_LABEL].map(names), prediction=frame["label"].map(names), probability=frame["probability"]
    )[["truth", "prediction", "probability"]]
    unknown = int(data["prediction"].isna().sum())
    if unknown:
        raise ValueError(f"{unknown} served labels are not the target's values {labels}")
    positive = names[spec.positive_class]
    definition = DataDefinition(
        classification=[
            BinaryClassification(name="default", target="truth", prediction_labels="prediction", pos_label=positive),
            BinaryClassification(name="scores", target="truth", prediction_probas="probability", pos_label=positive),
        ],
        categorical_columns=["truth", "prediction"],
        numerical_columns=["probability"],
    )
    report = Report([ClassificationPreset(), RocAuc(classification_name="scores")])
    snapshot = report.run(current_data=Dataset.from_pandas(data, data_definition=definition), reference_data=None)
    wanted = {"Accuracy", "Precision", "Recall", "F1Score", "RocAuc", "TPR", "TNR", "FPR", "FNR"}
    keys = {"F1Score": "f1", "RocAuc": "roc_auc"}
    metrics: dict[str, Any] = {}
    for metric in snapshot.dict()["metrics"]:
        kind = (metric.get("config") or {}).get("type", "").rsplit(":", 1)[-1]
        if kind in wanted:
            metrics[keys.get(kind, kind.lower())] = float(metric["value"])
    missing = sorted({"accuracy", "precision", "recall", "f1", "roc_auc"} - set(metrics))
    if missing:
        raise QualityError(f"Evidently returned no {missing}")
    # Counted here (Evidently draws the matrix in the report but returns no values for it).
    matrix = [[int(((truth == t) & (frame["label"].to_numpy() == p)).sum()) for p in labels] for t in labels]
    metrics.update(
        rows=len(frame),
        positive_share=round(float((truth == spec.positive_class).mean()), 6),
        confusion_matrix={"labels": [_plain(v) for v in labels], "matrix": matrix},
    )
    return snapshot, metrics


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# --- holdout and comparison --------------------------------------------------------------------


def holdout_metrics(tracking_uri: str, model_name: str, version: str) -> dict[str, float] | None:
    """The version's holdout metrics: the ``test_*`` metrics of its MLflow training run.

    Returns:
        ``{accuracy, precision, ...}`` without the prefix, or None when the run logged none.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:
        return None
    metrics = client.get_run(run_id).data.metrics
    found = {key.removeprefix("test_"): float(value) for key, value in metrics.items() if key.startswith("test_")}
    return found or None


def compare(live: dict[str, Any], holdout: dict[str, float] | None, max_drop: dict[str, float]) -> list[dict[str, Any]]:
    """The metric comparison table: one row per metric, live against holdout.

    Args:
        live: The live metrics (``classification_quality``).
        holdout: The holdout metrics, or None when unknown.
        max_drop: Largest tolerated fall per metric (absolute, e.g. 0.05 = 5 points).

    Returns:
        Rows ``{metric, holdout, live, change, max_drop, degraded}``; ``change`` is live -
        holdout, ``degraded`` is True when the metric fell by at least its ``max_drop``.
    """
    rows = []
    for metric in COMPARED_METRICS:
        value = live.get(metric)
        reference = (holdout or {}).get(metric)
        known = _finite(value) and _finite(reference)
        change = value - reference if known else None
        limit = max_drop.get(metric)
        degraded = bool(known and limit is not None and -change >= limit - _EPSILON)
        rows.append(
            {
                "metric": metric,
                "holdout": _round(reference),
                "live": _round(value),
                "change": _round(change),
                "max_drop": limit,
                "degraded": degraded,
            }
        )
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _round(value: Any) -> Any:
    return round(value, 6) if _finite(value) else None


def render_comparison(rows: list[dict[str, Any]]) -> str:
    """The comparison table as Markdown (logs, the MLflow run, the DAG docs)."""

    def cell(value: Any, sign: str = "") -> str:
        return "-" if value is None else f"{value:{sign}.4f}"

    lines = ["| metric | holdout | live | change | max drop | degraded |", "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(
            f"| {row['metric']} | {cell(row['holdout'])} | {cell(row['live'])} | {cell(row['change'], '+')} | "
            f"{cell(row['max_drop'])} | {'yes' if row['degraded'] else 'no'} |"
        )
    return "\n".join(lines)


# --- the whole check ---------------------------------------------------------------------------


@dataclass
class QualityCheck:
    """One check's outcome: the JSON summary and the Evidently snapshots (for the HTML)."""

    summary: dict[str, Any]
    snapshots: dict[str, Any] = field(default_factory=dict)  # report name -> snapshot

    @property
    def skipped(self) -> bool:
        return self.summary["outcome"] == "skipped"


def evaluate_window(
    joined: pd.DataFrame,
    counts: JoinCounts,
    *,
    spec: DatasetSpec,
    model_name: str,
    champion_version: str,
    holdout: dict[str, dict[str, float] | None],
    window: QualityWindow,
    config: QualityConfig,
) -> QualityCheck:
    """Metrics per version, the comparison with the holdout, and the champion's verdict.

    Args:
        joined: The labelled predictions (``tasks.feedback.labelled_window``).
        counts: What the join counted.
        spec: The dataset.
        model_name: Registered model.
        champion_version: The version the verdict is about.
        holdout: Holdout metrics per version (``holdout_metrics``); a missing version has none.
        window: The check's window.
        config: Thresholds and minimum rows.

    Returns:
        The check; ``summary["outcome"]`` is ``checked`` or ``skipped`` (with ``reason``).
    """
    frames = evaluation_frames(joined)
    versions, snapshots = [], {}
    for (version, scored_as), frame in frames.items():
        entry: dict[str, Any] = {"model_version": version, "scored_as": scored_as, "rows": len(frame)}
        if len(frame) < config.min_labelled_rows:
            entry["skipped"] = f"{len(frame)} labelled rows (minimum {config.min_labelled_rows})"
        else:
            try:
                snapshot, metrics = classification_quality(frame, spec)
            except ValueError as err:
                entry["skipped"] = str(err)
            else:
                entry["metrics"] = metrics
                entry["comparison"] = compare(metrics, holdout.get(version), config.max_drop)
                entry["degraded"] = any(row["degraded"] for row in entry["comparison"])
                snapshots[_report_name(version, scored_as, champion_version)] = snapshot
        versions.append(entry)
    champion = next(
        (v for v in versions if v["model_version"] == str(champion_version) and v["scored_as"] == SERVED),
        {"model_version": str(champion_version), "scored_as": SERVED, "rows": 0, "skipped": "no labelled rows"},
    )
    summary: dict[str, Any] = {
        "dataset": spec.name,
        "model_name": model_name,
        "champion_version": str(champion_version),
        "window": window.as_dict(),
        "feedback": counts.as_dict(),
        "labelled_rows": champion["rows"],
        "min_labelled_rows": config.min_labelled_rows,
        "primary_metric": config.primary_metric,
        "max_drop": dict(config.max_drop),
        "versions": versions,
    }
    reason = None
    if "skipped" in champion:
        reason = (
            f"champion v{champion_version}: {champion['skipped']} in the feedback of "
            f"{', '.join(window.feedback_days)}; no verdict on too little truth"
        )
    elif holdout.get(str(champion_version)) is None:
        reason = f"champion v{champion_version} has no holdout metrics (test_* of its MLflow run) to compare with"
    if reason is not None:
        summary.update(outcome="skipped", reason=reason, degraded=False)
        return QualityCheck(summary, snapshots)
    primary = next(row for row in champion["comparison"] if row["metric"] == config.primary_metric)
    summary.update(
        outcome="checked",
        degraded=champion["degraded"],
        metrics=champion["metrics"],
        comparison=champion["comparison"],
        holdout_metric=primary["holdout"],
        live_metric=primary["live"],
        reason=degradation_text(champion["comparison"], champion["rows"], champion_version),
    )
    return QualityCheck(summary, snapshots)


def _report_name(version: str, scored_as: str, champion_version: str) -> str:
    if version == str(champion_version) and scored_as == SERVED:
        return "report.html"
    return f"report-v{version}{'-shadow' if scored_as == SHADOW else ''}.html"


def degradation_text(comparison: list[dict[str, Any]], rows: int, version: str) -> str:
    """Which metrics fell by how much, in one line (the check's reason)."""
    fallen = [r for r in comparison if r["degraded"]]
    shown = fallen or [r for r in comparison if r["max_drop"] is not None]
    parts = [
        f"{r['metric']} {r['holdout']:.3f} -> {r['live']:.3f} ({r['change']:+.3f}, max drop {r['max_drop']})"
        for r in shown
        if r["change"] is not None
    ]
    verdict = "degraded" if fallen else "within the tolerated drops"
    return f"v{version} {verdict} on {rows:,} labelled rows: " + "; ".join(parts)


def run_quality_check(
    client: Any,
    *,
    tracking_uri: str,
    raw_bucket: str,
    lake_bucket: str,
    spec: DatasetSpec,
    model_name: str,
    window_end: dt.datetime,
    config: QualityConfig,
    log_prefix: str = "predictions",
) -> QualityCheck:
    """The whole computation of one check (everything but writing it down).

    Resolves the champion, joins the window's feedback with the prediction log, computes
    the metrics per version with Evidently and compares them with each version's holdout.

    Raises:
        QualityError: No champion: there is nothing to judge yet.
    """
    from mlflow import MlflowClient

    from tasks.tracking import CHAMPION, alias_version, check_tracking_server

    check_tracking_server(tracking_uri)
    champion = alias_version(MlflowClient(tracking_uri=tracking_uri), model_name, CHAMPION)
    if champion is None:
        raise QualityError(
            f"registered model {model_name!r} has no champion: nothing is served, so there is no quality to "
            "measure. Run network_security_training first (make run)."
        )
    window = quality_window(window_end, config)
    labelled = labelled_window(
        client,
        raw_bucket=raw_bucket,
        lake_bucket=lake_bucket,
        spec=spec,
        model_name=model_name,
        feedback_days=list(window.feedback_days),
        predictions_from=window.predictions_from,
        predictions_to=window.window_end,
        log_prefix=log_prefix,
    )
    versions = sorted({str(v) for v in labelled.frame.get("model_version", [])} | {str(champion)})
    if "shadow_model_version" in labelled.frame.columns:
        versions = sorted(set(versions) | {str(v) for v in labelled.frame["shadow_model_version"].dropna()})
    holdout = {version: holdout_metrics(tracking_uri, model_name, version) for version in versions}
    check = evaluate_window(
        labelled.frame,
        labelled.counts,
        spec=spec,
        model_name=model_name,
        champion_version=champion,
        holdout=holdout,
        window=window,
        config=config,
    )
    log.info("quality check: %s (%s)", check.summary["outcome"], check.summary["reason"])
    return check


# --- the performance signal --------------------------------------------------------------------


@dataclass(frozen=True)
class PerformanceSignal:
    """The quality trigger as a plain value, for the retrain rule shared with drift.

    Attributes:
        detected: The champion was degraded in ``consecutive_checks`` checks in a row.
        degraded: This check found the champion degraded.
        reason: One line for the training run's ``conf.reason`` and the logs.
        metric: The primary metric.
        before: Its holdout value.
        after: Its live value.
        labelled_rows: Labelled predictions of the champion in this check.
        streak: Consecutive degraded checks of this champion, this one included.
    """

    detected: bool
    degraded: bool
    reason: str
    metric: str
    before: float | None
    after: float | None
    labelled_rows: int
    streak: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def performance_signal(
    summary: dict[str, Any], history: list[dict[str, Any]], consecutive_checks: int
) -> PerformanceSignal:
    """Whether the champion's live quality fell far enough, long enough, to retrain.

    Args:
        summary: This check's summary (``QualityCheck.summary``).
        history: Earlier checks of the same dataset, newest first, each with
            ``champion_version``, ``degraded`` and ``decision`` (rows of
            ``latest_quality_checks.sql``). Skipped checks neither count nor break the streak;
            a check of another champion version ends it (a new champion starts afresh).
        consecutive_checks: Degraded checks in a row needed (K).
    """
    metric = summary["primary_metric"]
    rows = int(summary.get("labelled_rows") or 0)
    if summary["outcome"] == "skipped":
        return PerformanceSignal(False, False, f"quality skipped: {summary['reason']}", metric, None, None, rows, 0)
    before, after = summary.get("holdout_metric"), summary.get("live_metric")
    version = str(summary["champion_version"])
    if not summary["degraded"]:
        return PerformanceSignal(False, False, f"quality: {summary['reason']}", metric, before, after, rows, 0)
    streak = 1
    for check in history:
        if streak >= consecutive_checks:
            break
        if check.get("decision") == "skipped":
            continue
        if str(check.get("champion_version")) != version or not bool(check.get("degraded")):
            break
        streak += 1
    detected = streak >= consecutive_checks
    suffix = (
        f"; {streak} degraded check(s) in a row"
        if detected
        else f"; degraded in {streak} of the {consecutive_checks} consecutive checks needed"
    )
    return PerformanceSignal(
        detected, True, f"quality: {summary['reason']}{suffix}", metric, before, after, rows, streak
    )


def retrain_conf(summary: dict[str, Any], signal: PerformanceSignal) -> dict[str, Any]:
    """The quality part of a triggered training run's ``conf``: why, and which feedback to learn from.

    Returns:
        ``reason`` (one line), ``quality`` (metric, before, after, labelled rows, champion
        version, streak, report) and ``feedback`` (the arguments of
        ``tasks.feedback.feedback_training_frame``: model, feedback days, prediction window).
    """
    window = summary["window"]
    return {
        "reason": signal.reason,
        "quality": {
            "metric": signal.metric,
            "before": signal.before,
            "after": signal.after,
            "labelled_rows": signal.labelled_rows,
            "streak": signal.streak,
            "champion_version": summary["champion_version"],
            "report_uri": summary.get("report_uri"),
        },
        "feedback": {
            "model_name": summary["model_name"],
            "feedback_days": list(window["feedback_days"]),
            "predictions_from": window["predictions_from"],
            "predictions_to": window["end"],
        },
    }


# --- the monitoring store ----------------------------------------------------------------------

QUALITY_CHECK_FIELDS = (
    "dag_run_id",
    "dataset",
    "model_name",
    "champion_version",
    "window_start",
    "window_end",
    "feedback_rows",
    "labelled_rows",
    "duplicate_labels",
    "unknown_request_ids",
    "invalid_feedback_rows",
    "primary_metric",
    "holdout_metric",
    "live_metric",
    "accuracy",
    "precision",
    "recall",
    "roc_auc",
    "degraded",
    "decision",
    "reason",
    "metrics_json",
    "report_uri",
    "triggered_run_id",
    "checked_at",
)
# The columns of include/sql/latest_quality_checks.sql, in its order.
LATEST_QUALITY_CHECK_COLUMNS = (
    "dataset",
    "model_name",
    "window_end",
    "champion_version",
    "labelled_rows",
    "primary_metric",
    "holdout_metric",
    "live_metric",
    "degraded",
    "decision",
    "reason",
    "report_uri",
    "triggered_run_id",
)


def quality_check_row(
    dag_run_id: str,
    summary: dict[str, Any],
    *,
    decision: str,
    reason: str,
    triggered_run_id: str | None = None,
    checked_at: dt.datetime,
) -> dict[str, Any]:
    """One row of the ``quality_check`` table (``include/sql/monitoring_store.sql``).

    Args:
        dag_run_id: The check's run (the primary key: a rerun replaces its row).
        summary: The check's summary (checked or skipped).
        decision: What the retrain rule decided (retrain | no_degradation | degradation_pending |
            training_active | cooldown | skipped | no_labelled_data).
        reason: Why, in one line.
        triggered_run_id: The training run it started, if any.
        checked_at: When the check was recorded.
    """
    feedback = summary.get("feedback") or {}
    metrics = summary.get("metrics") or {}
    window = summary.get("window") or {}
    row = {
        "dag_run_id": dag_run_id,
        "dataset": summary["dataset"],
        "model_name": summary["model_name"],
        "champion_version": summary.get("champion_version"),
        "window_start": window.get("start"),
        "window_end": window.get("end"),
        "feedback_rows": feedback.get("feedback_rows"),
        "labelled_rows": summary.get("labelled_rows"),
        "duplicate_labels": feedback.get("duplicate_labels"),
        "unknown_request_ids": feedback.get("unknown_request_ids"),
        "invalid_feedback_rows": feedback.get("invalid_feedback_rows"),
        "primary_metric": summary.get("primary_metric"),
        "holdout_metric": summary.get("holdout_metric"),
        "live_metric": summary.get("live_metric"),
        **{name: metrics.get(name) for name in ("accuracy", "precision", "recall", "roc_auc")},
        "degraded": int(bool(summary.get("degraded"))),
        "decision": decision,
        "reason": reason,
        "metrics_json": json.dumps(
            {
                "versions": summary.get("versions", []),
                "comparison": summary.get("comparison"),
                # What a retrain triggered later, for a drift check, names of this one (held_quality_signal).
                "signal": summary.get("signal"),
            },
            default=str,
        ),
        "report_uri": summary.get("report_uri"),
        "triggered_run_id": triggered_run_id,
        "checked_at": checked_at.astimezone(dt.UTC).isoformat(),
    }
    return {name: row[name] for name in QUALITY_CHECK_FIELDS}


def history_from_records(
    records: list[tuple[Any, ...]], dataset: str, model_name: str, before: str
) -> list[dict[str, Any]]:
    """``latest_quality_checks.sql``'s records as dicts: this dataset and model, windows before ``before``."""
    rows = [dict(zip(LATEST_QUALITY_CHECK_COLUMNS, record, strict=True)) for record in records]
    return [
        r for r in rows if r["dataset"] == dataset and r["model_name"] == model_name and str(r["window_end"]) < before
    ]


# --- outputs -------------------------------------------------------------------------------------


def report_prefix(dataset: str, dag_run_id: str) -> str:
    """``quality/<dataset>/<run>``: where a check's report and summary go in the lake."""
    folder = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in dag_run_id)
    return f"quality/{dataset}/{folder}"


def write_outputs(client: Any, bucket: str, prefix: str, check: QualityCheck) -> dict[str, str]:
    """``summary.json`` and one Evidently HTML report per evaluated version under ``s3://<bucket>/<prefix>/``.

    ``report.html`` is the champion's; other versions get ``report-v<version>[-shadow].html``.
    Adds ``report_uri`` (the champion's, when evaluated), ``report_uris`` and ``summary_uri``
    to the summary and returns them.
    """
    from tasks.drift import render_html

    base = storage.S3Location(bucket, prefix.strip("/"))
    reports = {
        name: storage.put_bytes(client, base.child(name), render_html(snapshot), content_type="text/html")
        for name, snapshot in sorted(check.snapshots.items())
    }
    uris = {"report_uri": reports.get("report.html"), "report_uris": reports}
    check.summary.update(uris)
    summary_uri = storage.put_json(client, base.child("summary.json"), check.summary)
    check.summary["summary_uri"] = summary_uri
    return {**{k: v for k, v in uris.items() if v}, "summary_uri": summary_uri}


def log_monitoring_run(
    tracking_uri: str, experiment: str, check: QualityCheck, tags: dict[str, str]
) -> tuple[str, str]:
    """A run in the monitoring experiment: live metrics, holdout, counts, the summary and reports.

    Returns:
        (experiment id, run id).
    """
    import mlflow

    from tasks.drift import render_html

    summary = check.summary
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"quality {summary['window']['end'][:16]}") as run:
        mlflow.set_tags(
            {
                **tags,
                "check": "quality",
                "dataset": summary["dataset"],
                "model_name": summary["model_name"],
                "champion_version": summary["champion_version"],
                "outcome": summary["outcome"],
            }
        )
        mlflow.log_params({"primary_metric": summary["primary_metric"], "window_end": summary["window"]["end"]})
        counts = {k: v for k, v in summary["feedback"].items() if isinstance(v, int)}
        live = {k: v for k, v in (summary.get("metrics") or {}).items() if _finite(v)}
        holdout = {
            f"holdout_{r['metric']}": r["holdout"] for r in summary.get("comparison") or [] if _finite(r["holdout"])
        }
        mlflow.log_metrics({**counts, **live, **holdout, "degraded": float(bool(summary["degraded"]))})
        mlflow.log_dict(summary, "quality/summary.json")
        if summary.get("comparison"):
            mlflow.log_text(render_comparison(summary["comparison"]), "quality/comparison.md")
        for name, snapshot in check.snapshots.items():
            mlflow.log_text(render_html(snapshot).decode(), f"quality/{name}")
        return run.info.experiment_id, run.info.run_id


# --- the quality DAG's plan and steps ------------------------------------------------------------

# Quality configuration a check's run params may override (include/quality.yaml holds the rest);
# ``cooldown_minutes`` is the one cooldown shared with the drift check (include/drift.yaml).
QUALITY_OVERRIDES = ("min_labelled_rows", "feedback_window_days", "lookback_days", "consecutive_checks")
# Outcomes of a held signal: it was ready when its check decided, and storm protection held it back.
HELD_OUTCOMES = ("training_active", "cooldown", "no_labelled_data")


@dataclass(frozen=True)
class QualityPlan:
    """One quality check (the quality DAG's plan, as ``tasks.plan.CheckPlan`` is the drift DAG's).

    Attributes:
        dataset: Dataset spec name.
        model_name: Registered model whose champion is judged.
        raw_prefix: The dataset's folder in the raw bucket (where labelled days land).
        settings: The resolved settings.
        config: ``include/quality.yaml`` with the run's overrides.
        window_end: The run's data interval end (ISO 8601, UTC).
        cooldown_minutes: The retrain cooldown shared with the drift check (``include/drift.yaml``).
        retrain_window_days: Days of labelled drops the triggered run trains on (``include/drift.yaml``).
        psi_threshold: The drift check's threshold (to name a held drift signal's reason).
        drift_window_hours: How old a held drift check may be to join this check's decision.
        run_type: The DAG run's type.
    """

    dataset: str
    model_name: str
    raw_prefix: str
    settings: Any
    config: QualityConfig
    window_end: str
    cooldown_minutes: int = 360
    retrain_window_days: int = 1
    psi_threshold: float = 0.25
    drift_window_hours: int = 24
    run_type: str = "manual"

    @property
    def window_end_time(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.window_end)

    @property
    def spec(self) -> DatasetSpec:
        from tasks.dataset_spec import load_spec

        return load_spec(self.dataset)

    def to_xcom(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["settings"] = asdict(self.settings)
        values["config"] = asdict(self.config)
        return values

    @classmethod
    def from_xcom(cls, values: dict[str, Any]) -> QualityPlan:
        from tasks.config import Settings

        return cls(
            **{**values, "settings": Settings(**values["settings"]), "config": QualityConfig(**values["config"])}
        )


def plan_quality_checks(
    settings: Any,
    params: dict[str, Any] | None,
    window_end: dt.datetime,
    run_type: Any,
    known_datasets: list[str],
    has_champion: Any = None,
) -> list[QualityPlan]:
    """One quality check per monitored dataset (``tasks.datasets.monitored_datasets``), as the drift DAG plans
    (``has_champion``: as ``tasks.plan.plan_checks``'s).

    Raises:
        PlanError: An unknown dataset, an invalid override, or no dataset with a champion.
    """
    from tasks.datasets import NothingMonitored, champion_lookup, monitored_datasets
    from tasks.plan import PlanError

    params = dict(params or {})
    has_champion = has_champion or champion_lookup(settings.mlflow_tracking_uri)
    try:
        datasets = monitored_datasets(settings, known_datasets, has_champion, params.get("dataset"))
    except (NothingMonitored, ValueError) as err:
        raise PlanError(str(err)) from None
    return [
        plan_quality_check(settings, {**params, "dataset": name}, window_end, run_type, known_datasets)
        for name in datasets
    ]


def plan_quality_check(
    settings: Any,
    params: dict[str, Any] | None,
    window_end: dt.datetime,
    run_type: Any,
    known_datasets: list[str],
    config: QualityConfig | None = None,
) -> QualityPlan:
    """The plan of a quality check: run params override the dataset, ``include/quality.yaml`` and the cooldown.

    Raises:
        PlanError: An unknown dataset or an invalid override.
    """
    from tasks.config import model_name_for
    from tasks.dataset_spec import load_spec
    from tasks.drift import load_drift_config
    from tasks.plan import PlanError, check_dataset

    params = dict(params or {})
    dataset = check_dataset(params.get("dataset") or settings.dataset, known_datasets)
    model_name = model_name_for(settings, dataset)  # the model-name setting names the settings' own dataset's model
    settings = settings.replace(dataset=dataset)
    drift_config = load_drift_config()
    try:
        config = (config or load_quality_config()).replace(**{key: params.get(key) for key in QUALITY_OVERRIDES})
        cooldown = params.get("cooldown_minutes")
        cooldown = drift_config.cooldown_minutes if cooldown is None else int(cooldown)
        if cooldown < 0:
            raise ValueError(f"cooldown_minutes must be 0 or more, got {cooldown}")
    except (TypeError, ValueError) as err:
        raise PlanError(f"quality check params: {err}") from None
    spec = load_spec(settings.dataset)
    plan = QualityPlan(
        dataset=spec.name,
        model_name=model_name,
        raw_prefix=spec.raw_prefix,
        settings=settings,
        config=config,
        window_end=window_end.astimezone(dt.UTC).isoformat(),
        cooldown_minutes=cooldown,
        retrain_window_days=drift_config.retrain_window_days,
        psi_threshold=drift_config.psi_threshold,
        drift_window_hours=drift_config.window_hours,
        run_type=str(getattr(run_type, "value", run_type)),
    )
    log.info("quality check plan: %s", plan.to_xcom())
    return plan


def run_check(client: Any, store: Any, plan: QualityPlan, dag_run_id: str) -> dict[str, Any]:
    """The check: metrics of the window's labelled predictions; reports to S3, a monitoring run in MLflow.

    Returns:
        The summary with ``report_uri`` / ``summary_uri``, ``mlflow_run_url`` and ``report_url``.

    Raises:
        QualityError: No champion (not worth retrying).
        NotEnoughData: Too few labelled rows; the skipped check is recorded (with the reason) first.
    """
    from tasks import retrain
    from tasks.drift import NotEnoughData

    tracking_uri = plan.settings.mlflow_tracking_uri
    check = run_quality_check(
        client,
        tracking_uri=tracking_uri,
        raw_bucket=plan.settings.raw_bucket,
        lake_bucket=plan.settings.lake_bucket,
        spec=plan.spec,
        model_name=plan.model_name,
        window_end=plan.window_end_time,
        config=plan.config,
    )
    write_outputs(client, plan.settings.lake_bucket, report_prefix(plan.dataset, dag_run_id), check)
    experiment_id, run_id = log_monitoring_run(
        tracking_uri, plan.config.monitoring_experiment, check, {"airflow_dag_run_id": dag_run_id}
    )
    summary = check.summary
    summary["mlflow_run_id"] = run_id
    summary["mlflow_run_url"] = storage.mlflow_run_url(tracking_uri, experiment_id, run_id)
    if summary.get("report_uri"):
        summary["report_url"] = storage.mlflow_artifact_url(tracking_uri, run_id, "quality/report.html")
    summary = json.loads(json.dumps(summary, default=_plain))  # plain JSON for XCom (numpy values)
    if check.skipped:
        record_check(store, plan, dag_run_id, summary, retrain.Decision(False, "skipped", summary["reason"]))
        raise NotEnoughData(summary["reason"], summary)
    return summary


def record_check(store: Any, plan: QualityPlan, dag_run_id: str, summary: dict[str, Any], decision: Any) -> None:
    """The check's row in ``quality_check``, with its decision and the run it triggered."""
    from tasks import monitoring_store

    row = quality_check_row(
        dag_run_id,
        {**summary, "window": {**summary.get("window", {}), "end": plan.window_end}},
        decision=decision.outcome,
        reason=decision.reason,
        triggered_run_id=decision.run_id,
        checked_at=dt.datetime.now(dt.UTC),
    )
    monitoring_store.write(store, "quality_check", [row])


def quality_signal(summary: dict[str, Any], history: list[dict[str, Any]], consecutive: int) -> Any:
    """This check's verdict as a signal of the shared retrain rule (``tasks.retrain``).

    The streak is :func:`performance_signal`'s (same champion version, skipped checks ignored);
    the evidence is :func:`retrain_conf`'s ``quality`` and ``feedback`` (what the triggered run
    learns from).
    """
    from tasks import retrain

    performance = performance_signal(summary, history, consecutive)
    evidence = {k: v for k, v in retrain_conf(summary, performance).items() if k != "reason"}
    return retrain.Signal(
        kind="quality",
        fired=performance.degraded,
        history=(True,) * max(performance.streak - 1, 0),
        consecutive=consecutive,
        reason=performance.reason,
        evidence=evidence,
    )


def held_drift_signal(store: Any, plan: QualityPlan, last_retrain_at: dt.datetime | None) -> Any | None:
    """The drift check's latest signal when it is ready but was held back (active run, cooldown), else None.

    A drift check within the drift window before this check that found drift and was held
    by storm protection (and no retrain was triggered since) still stands: a retrain this
    check triggers names it too, so drift and quality together make one run naming both.
    """
    from tasks import drift, monitoring_store

    end = plan.window_end_time
    since = end - dt.timedelta(hours=plan.drift_window_hours)
    rows = monitoring_store.query(
        store, "latest_drift_signal", dataset=plan.dataset, since=since.isoformat(), until=plan.window_end
    )
    if not rows:
        return None
    row = rows[0]
    checked_end = dt.datetime.fromisoformat(row["window_end"])
    if not row["drift_detected"] or row["decision"] not in HELD_OUTCOMES:
        return None
    if last_retrain_at is not None and checked_end <= last_retrain_at:
        return None
    summary = {
        "drift_detected": True,
        "drifted_features": json.loads(row["drifted_features"] or "[]"),
        "max_psi": row["max_psi"],
        "prediction_psi": row["prediction_psi"],
        "psi_threshold": plan.psi_threshold,
        "report_uri": row["report_uri"],
    }
    return drift.drift_signal(summary, [], 1)


def held_quality_signal(
    store: Any, dataset: str, window_end: dt.datetime, max_age: dt.timedelta, last_retrain_at: dt.datetime | None
) -> Any | None:
    """The quality check's latest signal when it was ready but held back (active run, cooldown), else None.

    The drift check's counterpart of :func:`held_drift_signal`: a drift check that triggers a
    retrain names a quality drop storm protection held back (within ``max_age``, and no retrain
    triggered since), so the run learns from the feedback too.
    """
    from tasks import monitoring_store, retrain

    since = window_end - max_age
    rows = monitoring_store.query(
        store, "latest_quality_signal", dataset=dataset, since=since.isoformat(), until=window_end.isoformat()
    )
    if not rows:
        return None
    row = rows[0]
    if not row["degraded"] or row["decision"] not in HELD_OUTCOMES:
        return None
    if last_retrain_at is not None and dt.datetime.fromisoformat(row["window_end"]) <= last_retrain_at:
        return None
    signal = json.loads(row["metrics_json"] or "{}").get("signal") or {}
    if not signal:
        return None
    return retrain.Signal(kind="quality", fired=True, reason=signal["reason"], evidence=signal["evidence"])


def decide_retraining(
    client: Any, store: Any, plan: QualityPlan, summary: dict[str, Any], dag_run_id: str, active_training_runs: int
) -> Any:
    """Apply the retrain rule shared with drift to this check; record the check and a triggered retrain.

    History (K checks in a row) and the last triggered retrain (the one cooldown, any reason)
    come from the monitoring store; when this check's signal is ready, a drift signal held
    back by storm protection joins it (one run, both reasons). The run's ``ds`` is the newest
    labelled drop on or before the window.
    """
    from tasks import monitoring_store, retrain
    from tasks.drift import newest_labelled_day

    config = plan.config
    history = monitoring_store.query(
        store,
        "recent_quality_checks",
        dataset=plan.dataset,
        model_name=plan.model_name,
        before=plan.window_end,
        limit=max(config.consecutive_checks * 4, 20),
    )
    last_retrain_at = monitoring_store.last_retrain_at(store, plan.dataset, plan.window_end)
    signals = [quality_signal(summary, history, config.consecutive_checks)]
    summary = {**summary, "signal": {"reason": signals[0].reason, "evidence": dict(signals[0].evidence)}}
    if signals[0].ready:
        held = held_drift_signal(store, plan, last_retrain_at)
        if held is not None:
            signals.append(held)
    decision = retrain.decide(
        signals,
        dataset=plan.dataset,
        window_end=plan.window_end_time,
        guard=retrain.StormGuard(
            active_training_runs=active_training_runs,
            last_retrain_at=last_retrain_at,
            cooldown=dt.timedelta(minutes=plan.cooldown_minutes),
        ),
        labelled_day=newest_labelled_day(
            client, plan.settings.raw_bucket, plan.raw_prefix, plan.window_end_time.date().isoformat()
        ),
        window_days=plan.retrain_window_days,
    )
    if decision.trigger:
        monitoring_store.log_retrain(store, decision, plan.model_name, plan.window_end, dag_run_id)
    record_check(store, plan, dag_run_id, summary, decision)
    log.info("quality decision: %s (%s)", decision.outcome, decision.reason)
    return decision


def retraining_alert(dag_id: str, run_id: str, summary: dict[str, Any], retrain: dict[str, Any]) -> dict[str, Any]:
    """The webhook payload of a quality-triggered retrain (``plugins/network_security/alerts.py`` sends it)."""
    conf = retrain.get("conf") or {}
    return {
        "event": "quality_retraining_triggered",
        "text": (
            f":warning: live quality of {summary.get('model_name')} v{summary.get('champion_version')}: "
            f"{conf.get('reason')}; training run {retrain.get('run_id')} triggered"
        ),
        "dag_id": dag_id,
        "run_id": run_id,
        "training_run_id": retrain.get("run_id"),
        "signals": conf.get("signals"),
        "quality": conf.get("quality"),
        "report_url": summary.get("report_url"),
        "reason": conf.get("reason"),
    }
