"""The model card: identity, lineage, metrics table, gate decision, trigger and limitations."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.dataset_spec import DatasetSpec
from tasks.gate import METRICS, GateRule, decide
from tasks.model_card import render_model_card

RULE = GateRule()
CHALLENGER = {
    "accuracy": 0.95123,
    "precision": 0.94001,
    "recall": 0.96349,
    "f1": 0.95161,
    "roc_auc": 0.98765,
    "pr_auc": 0.98111,
}
CHAMPION = {
    "accuracy": 0.94000,
    "precision": 0.95000,
    "recall": 0.93000,
    "f1": 0.94000,
    "roc_auc": 0.98000,
    "pr_auc": float("nan"),
}
DATA = {
    "dataset": "network_security",
    "ds": "2024-05-03",
    "window_days": 3,
    "snapshot_uris": [f"s3://network-security-lake/snapshots/ds=2024-05-0{d}/data.parquet" for d in (1, 2, 3)],
    "content_hashes": ["a" * 64, "b" * 64, "c" * 64],
    "train_rows": 2400,
    "test_rows": 600,
    "validation_uri": "s3://network-security-lake/validation/ds=2024-05-03/result.json",
}
TRAINING = {
    "best_estimator": "gradient_boosting",
    "params": {"learning_rate": 0.1, "max_iter": 150},
    "cv_metrics": {"cv_roc_auc_mean": 0.97654, "cv_roc_auc_std": 0.00321},
    "mlflow_run_id": "0123456789abcdef",
    "git_sha": "deadbeefcafe",
}
DRIFT_TRIGGER = {
    "run_type": "manual",
    "reason": "drift: 4 features above PSI 0.2",
    "drift_report_uri": "s3://network-security-lake/drift/ds=2024-05-03/report.html",
}


def card(network_spec: DatasetSpec, **overrides: Any) -> str:
    champion = overrides.get("champion_metrics", CHAMPION)
    arguments = {
        "model_name": "network_security",
        "challenger_version": "7",
        "champion_version": "5",
        "spec_dict": network_spec.to_dict(),
        "data": DATA,
        "training": TRAINING,
        "challenger_metrics": CHALLENGER,
        "champion_metrics": champion,
        "decision": decide(RULE, CHALLENGER, champion),
        "trigger": DRIFT_TRIGGER,
    } | overrides
    return render_model_card(**arguments)


def table_row(markdown: str, metric: str) -> list[str]:
    (row,) = [line for line in markdown.splitlines() if line.startswith(f"| {metric} |")]
    return [cell.strip() for cell in row.strip("|").split("|")]


def section(markdown: str, title: str) -> str:
    after = markdown.split(f"\n## {title}\n", 1)[1]
    return after.split("\n## ", 1)[0]


def test_title_names_model_and_version(network_spec: DatasetSpec) -> None:
    assert card(network_spec).startswith("# Model card: network_security v7\n")


def test_sections_in_order(network_spec: DatasetSpec) -> None:
    markdown = card(network_spec)
    titles = [line for line in markdown.splitlines() if line.startswith("## ")]

    assert titles == [
        "## Data",
        "## Model",
        "## Test metrics",
        "## Gate decision",
        "## Trigger",
        "## Limitations",
    ]


def test_data_and_model_lineage(network_spec: DatasetSpec) -> None:
    data = section(card(network_spec), "Data")
    model = section(card(network_spec), "Model")

    for expected in (
        "network_security",
        "2024-05-03",
        "3 day(s)",
        *DATA["snapshot_uris"],
        *DATA["content_hashes"],
        "2400",
        "600",
        DATA["validation_uri"],
        "positive class `-1`",
    ):
        assert expected in data
    for expected in (
        "gradient_boosting",
        "learning_rate=0.1",
        "cv_roc_auc_mean: 0.9765",
        "0123456789abcdef",
        "deadbeefcafe",
    ):
        assert expected in model


def test_partial_lineage_renders_what_is_present(network_spec: DatasetSpec) -> None:
    markdown = card(
        network_spec, data={"dataset": "network_security", "snapshot_uris": ["s3://lake/one.parquet"]}, training={}
    )

    assert "- snapshot: `s3://lake/one.parquet`" in section(markdown, "Data")
    assert "validation" not in section(markdown, "Data")
    assert section(markdown, "Model").strip() == ""


def test_metrics_table_with_champion(network_spec: DatasetSpec) -> None:
    markdown = card(network_spec)

    assert "| metric | challenger v7 | champion v5 | delta |" in markdown
    for metric in METRICS:
        assert table_row(markdown, metric)[1] == f"{CHALLENGER[metric]:.4f}"
    assert table_row(markdown, "roc_auc") == ["roc_auc", "0.9877", "0.9800", "+0.0077"]
    assert table_row(markdown, "precision") == ["precision", "0.9400", "0.9500", "-0.0100"]
    # A NaN champion metric cannot be compared.
    assert table_row(markdown, "pr_auc") == ["pr_auc", "0.9811", "n/a", "n/a"]


def test_metrics_table_without_champion(network_spec: DatasetSpec) -> None:
    markdown = card(network_spec, champion_version=None, champion_metrics=None)

    assert "champion v" not in section(markdown, "Test metrics")
    for metric in METRICS:
        assert table_row(markdown, metric) == [metric, f"{CHALLENGER[metric]:.4f}", "n/a", "n/a"]


def test_nan_challenger_metric_is_not_a_number_in_the_table(network_spec: DatasetSpec) -> None:
    broken = CHALLENGER | {"roc_auc": float("nan")}
    markdown = card(network_spec, challenger_metrics=broken, decision=decide(RULE, broken, CHAMPION))

    assert table_row(markdown, "roc_auc") == ["roc_auc", "n/a", "0.9800", "n/a"]
    assert "**reject**" in section(markdown, "Gate decision")


def test_gate_decision_and_every_reason(network_spec: DatasetSpec) -> None:
    decision = decide(RULE, CHALLENGER, CHAMPION)
    gate = section(card(network_spec), "Gate decision")

    assert "**promote**" in gate
    assert RULE.describe() in gate
    assert len(decision.reasons) >= 2
    for reason in decision.reasons:
        assert f"- {reason}" in gate
    assert "FORCED" not in card(network_spec)


def test_rejection_is_shown(network_spec: DatasetSpec) -> None:
    worse = CHALLENGER | {"roc_auc": 0.85}
    gate = section(
        card(network_spec, challenger_metrics=worse, decision=decide(RULE, worse, CHAMPION)), "Gate decision"
    )

    assert "**reject**" in gate
    assert "roc_auc 0.8500 is below the floor 0.9000" in gate


def test_forced_decision_carries_a_warning(network_spec: DatasetSpec) -> None:
    worse = CHALLENGER | {"roc_auc": 0.85}
    forced = decide(RULE, worse, CHAMPION, force="promote", force_reason="rollback of a bad release")
    gate = section(card(network_spec, challenger_metrics=worse, decision=forced), "Gate decision")

    assert "WARNING: FORCED decision" in gate
    assert "**forced_promote**" in gate
    assert "- FORCED promote by operator: rollback of a bad release" in gate
    assert "rule alone would have: reject" in gate


def test_trigger_from_drift(network_spec: DatasetSpec) -> None:
    trigger = section(card(network_spec), "Trigger")

    assert DRIFT_TRIGGER["reason"] in trigger
    assert DRIFT_TRIGGER["drift_report_uri"] in trigger
    assert "scheduled" not in trigger


@pytest.mark.parametrize("trigger", [None, {}, {"run_type": "scheduled"}])
def test_scheduled_trigger(network_spec: DatasetSpec, trigger: dict | None) -> None:
    assert section(card(network_spec, trigger=trigger), "Trigger").strip() == "- scheduled daily run"


def test_limitations(network_spec: DatasetSpec) -> None:
    limitations = section(card(network_spec), "Limitations")

    for expected in ("synthetic", "3% label noise", "single held-out split", "drift DAG", "threshold of 0.5"):
        assert expected in limitations
    assert f"the {len(network_spec.features)} features of the dataset spec" in limitations
