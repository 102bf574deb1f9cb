"""The model card: one Markdown page per challenger, logged with its training run.

It answers, without opening MLflow: what data the model saw (and where that exact data
lives), what was trained, how it scored against the champion on the same test split,
what the gate decided and why, what triggered the run, and what the numbers do not say.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.evaluate import finite
from tasks.gate import METRICS, GateDecision

NOT_AVAILABLE = "n/a"


def render_model_card(
    *,
    model_name: str,
    challenger_version: str,
    champion_version: str | None,
    spec_dict: dict,
    data: dict,
    training: dict,
    challenger_metrics: dict,
    champion_metrics: dict | None,
    decision: GateDecision,
    trigger: dict | None,
) -> str:
    """Render the model card of a challenger.

    Args:
        model_name: Registered model name.
        challenger_version: Registry version of the model the card describes.
        champion_version: Version of the serving champion it was compared with; None for the first model.
        spec_dict: ``DatasetSpec.to_dict()`` of the dataset.
        data: Lineage; any of dataset, ds, window_days, snapshot_uris, content_hashes, train_rows,
            test_rows, validation_uri. Missing keys are left out of the card.
        training: Any of estimator (or best_estimator), params, cv_metrics, mlflow_run_id, git_sha.
        challenger_metrics: Test metrics of the challenger (``tasks.gate.METRICS`` keys).
        champion_metrics: Test metrics of the champion on the same split; None without a champion.
        decision: The gate decision and its reasons.
        trigger: Why the run happened (run_type, reason, drift_report_uri, ...); None or empty for
            the scheduled daily run.

    Returns:
        The card as Markdown.
    """
    sections = [
        [f"# Model card: {model_name} v{challenger_version}"],
        _data_section(spec_dict, data),
        _model_section(training),
        _metrics_section(challenger_version, champion_version, challenger_metrics, champion_metrics),
        _decision_section(decision),
        _trigger_section(trigger),
        _limitations_section(spec_dict),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _data_section(spec_dict: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    dataset = data.get("dataset") or spec_dict.get("name")
    if dataset:
        lines.append(f"- dataset: `{dataset}`")
    target = spec_dict.get("target") or {}
    if target.get("name") is not None and "positive_class" in spec_dict:
        lines.append(f"- label: `{target['name']}`, positive class `{spec_dict['positive_class']}`")
    if data.get("ds"):
        window_days = data.get("window_days")
        window = f" (window of {window_days} day(s) ending that day)" if window_days else ""
        lines.append(f"- ds: {data['ds']}{window}")
    for key, label, plural in (
        ("snapshot_uris", "snapshot", "snapshots"),
        ("content_hashes", "content sha256", "content sha256 hashes"),
    ):
        values = _as_list(data.get(key))
        if len(values) == 1:
            lines.append(f"- {label}: `{values[0]}`")
        elif values:
            lines.append(f"- {plural}:")
            lines.extend(f"  - `{value}`" for value in values)
    for key, label in (("train_rows", "train rows"), ("test_rows", "test rows")):
        if data.get(key) is not None:
            lines.append(f"- {label}: {data[key]}")
    if data.get("validation_uri"):
        lines.append(f"- validation result: `{data['validation_uri']}`")
    return lines


def _model_section(training: Mapping[str, Any]) -> list[str]:
    lines = ["## Model", ""]
    # The training task reports the winning candidate as best_estimator.
    estimator = training.get("estimator") or training.get("best_estimator")
    if estimator:
        lines.append(f"- estimator: `{estimator}`")
    params = training.get("params")
    if params:
        lines.append("- params: " + ", ".join(f"`{key}={value}`" for key, value in params.items()))
    cv_metrics = training.get("cv_metrics")
    if cv_metrics:
        lines.append("- cross-validation on the train split:")
        lines.extend(f"  - {key}: {_number(value)}" for key, value in cv_metrics.items())
    if training.get("mlflow_run_id"):
        lines.append(f"- MLflow run: `{training['mlflow_run_id']}`")
    if training.get("git_sha"):
        lines.append(f"- git commit: `{training['git_sha']}`")
    return lines


def _metrics_section(
    challenger_version: str,
    champion_version: str | None,
    challenger_metrics: Mapping[str, Any],
    champion_metrics: Mapping[str, Any] | None,
) -> list[str]:
    champion_header = f"champion v{champion_version}" if champion_version is not None else "champion"
    lines = [
        "## Test metrics",
        "",
        "Both models scored on the same held-out test split.",
        "",
        f"| metric | challenger v{challenger_version} | {champion_header} | delta |",
        "|---|---:|---:|---:|",
    ]
    for metric in METRICS:
        challenger_value = finite(challenger_metrics.get(metric))
        champion_value = finite(champion_metrics.get(metric)) if champion_metrics else None
        if challenger_value is None or champion_value is None:
            delta = NOT_AVAILABLE
        else:
            delta = f"{challenger_value - champion_value:+.4f}"
        lines.append(f"| {metric} | {_number(challenger_value)} | {_number(champion_value)} | {delta} |")
    return lines


def _decision_section(decision: GateDecision) -> list[str]:
    lines = ["## Gate decision", ""]
    if decision.forced:
        lines += [
            "> **WARNING: FORCED decision.** An operator overrode the promotion rule; "
            "the reasons below say why and what the rule alone would have decided.",
            "",
        ]
    lines.append(f"Decision: **{decision.decision}**")
    if decision.rule:
        lines += ["", f"Rule: {decision.rule}"]
    lines += ["", "Reasons:", ""]
    lines.extend(f"- {reason}" for reason in decision.reasons)
    return lines


def _trigger_section(trigger: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Trigger", ""]
    details = {key: value for key, value in (trigger or {}).items() if value not in (None, "", [])}
    if not details or details == {"run_type": "scheduled"}:
        lines.append("- scheduled daily run")
        return lines
    labels = {"run_type": "run type", "reason": "reason", "drift_report_uri": "drift report"}
    for key, value in details.items():
        if isinstance(value, list | tuple):
            value = ", ".join(str(item) for item in value)
        elif isinstance(value, float):
            value = _number(value)
        shown = f"`{value}`" if key.endswith("_uri") else value
        lines.append(f"- {labels.get(key, key.replace('_', ' '))}: {shown}")
    return lines


def _limitations_section(spec_dict: Mapping[str, Any]) -> list[str]:
    feature_count = len(spec_dict.get("features") or [])
    features = f"the {feature_count} features of the dataset spec" if feature_count else "the dataset spec's features"
    return [
        "## Limitations",
        "",
        "- Trained and tested on synthetic data from a generator with about 3% label noise, "
        "not on real traffic: the numbers show the pipeline works, not how well phishing is caught in the wild.",
        "- Test metrics come from a single held-out split of one data window; "
        "they carry sampling noise that the gate's tolerance only partly absorbs.",
        f"- The model sees only {features}; any signal outside them is invisible to it.",
        "- Performance under drift is not measured here: it is monitored by the drift DAG, "
        "which can trigger retraining.",
        "- Predictions use a decision threshold of 0.5 on the positive-class probability; "
        "precision, recall and f1 above hold at that threshold only.",
    ]


def _number(value: Any) -> str:
    number = finite(value)
    return NOT_AVAILABLE if number is None else f"{number:.4f}"


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
