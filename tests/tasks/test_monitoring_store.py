"""The monitoring store's rows and queries on a real SQLite database with the shipped DDL."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from tasks import monitoring_store as ms

EVALUATION = {
    "decision": "promote",
    "reasons": ["roc_auc 0.97 >= floor 0.90", "no champion yet"],
    "primary_metric": "roc_auc",
    "challenger_version": "3",
    "champion_version": "2",
    "challenger_metrics": {"roc_auc": 0.97, "f1": 0.9},
    "champion_metrics": {"roc_auc": math.nan},
    "run_id": "run-3",
}


def test_every_table_of_the_ddl_has_its_columns_and_key(store):
    for table, (columns, key) in ms.TABLES.items():
        info = store.connection.execute(f"PRAGMA table_info({table})").fetchall()
        assert [row["name"] for row in info] == list(columns), table
        assert [row["name"] for row in sorted(info, key=lambda r: r["pk"]) if row["pk"]] == list(key), table


def test_promotion_row_of_a_gate_decision(store):
    row = ms.promotion_row(dag_run_id="r1", model_name="m", ds="2026-01-31", evaluation=EVALUATION, decided_at="t")
    assert row["reason"] == "roc_auc 0.97 >= floor 0.90; no champion yet"
    assert (row["challenger_metric"], row["champion_metric"]) == (0.97, None)  # NaN is stored as NULL
    assert json.loads(row["metrics_json"])["challenger"] == {"roc_auc": 0.97, "f1": 0.9}
    ms.write(store, "promotion_log", [row])
    ms.write(store, "promotion_log", [{**row, "decided_at": "t2"}])  # a rerun overwrites
    (stored,) = ms.rows_of_run(store, "promotions_of_run", "r1")
    assert (stored["model_version"], stored["decided_at"], stored["champion_version"]) == ("3", "t2", "2")


def test_deployment_rows_one_per_target_and_action(store):
    common = {"dag_run_id": "r1", "model_name": "m", "model_version": "3", "recorded_at": "t"}
    ec2 = ms.deployment_row(
        **common, action="deploy", target="ec2", status="deployed", detail="d", instance_ids=["i-1"]
    )
    local = ms.deployment_row(
        **common, action="deploy", target="local", status="deployed", detail="d", endpoint="http://x"
    )
    back = ms.deployment_row(**common, action="rollback", target="local", status="rolled_back", detail="d")
    assert ec2["deployment_id"] == "r1/ec2/deploy" and json.loads(ec2["instance_ids"]) == ["i-1"]
    assert local["instance_ids"] is None
    ms.write(store, "deployment_log", [ec2, local, back])
    assert [(r["target"], r["action"]) for r in ms.rows_of_run(store, "deployments_of_run", "r1")] == [
        ("ec2", "deploy"), ("local", "deploy"), ("local", "rollback"),
    ]  # fmt: skip


def check_row(run: str, dataset: str, end: str, detected: bool, decision: str) -> dict:
    summary = {"drift_detected": detected, "max_psi": 0.3, "rows": {"current": 10}, "champion": {"model_version": "1"}}
    return ms.drift_check_row(
        dag_run_id=run, dataset=dataset, model_name="m", window_start="s", window_end=end,
        summary=summary, decision=decision, reason="why", checked_at="t",
    )  # fmt: skip


def test_drift_history_is_one_datasets_checks_before_the_window_newest_first(store):
    rows = [
        check_row("a", "network_security", "2026-01-01T10:00:00+00:00", True, "drift_pending"),
        check_row("b", "network_security", "2026-01-01T11:00:00+00:00", False, "no_drift"),
        check_row("c", "network_security", "2026-01-01T12:00:00+00:00", True, "skipped"),  # left out
        check_row("d", "intrusion_flows", "2026-01-01T12:30:00+00:00", True, "retrain"),  # another dataset
        check_row("e", "network_security", "2026-01-01T13:00:00+00:00", True, "retrain"),  # this window: left out
    ]
    ms.write(store, "drift_check", rows)
    before = "2026-01-01T13:00:00+00:00"
    assert ms.drift_history(store, "network_security", before) == [False, True]
    assert ms.drift_history(store, "network_security", before, limit=1) == [False]
    assert ms.drift_history(store, "intrusion_flows", before) == [True]
    assert ms.drift_history(store, "unknown", before) == []


def test_one_drift_run_keeps_a_row_per_dataset_and_a_rerun_overwrites_its_own(store):
    end = "2026-01-01T12:00:00+00:00"
    ms.write(store, "drift_check", [check_row("run", "network_security", end, False, "skipped")])
    ms.write(store, "drift_check", [check_row("run", "intrusion_flows", end, True, "retrain")])
    ms.write(store, "drift_check", [check_row("run", "intrusion_flows", end, True, "cooldown")])  # a retried task
    rows = ms.rows_of_run(store, "drift_check_of_run", "run")
    assert sorted((r["dataset"], r["decision"]) for r in rows) == [
        ("intrusion_flows", "cooldown"),
        ("network_security", "skipped"),
    ]


def test_a_skipped_check_row_keeps_what_was_found(store):
    row = ms.drift_check_row(
        dag_run_id="r", dataset="d", model_name="m", window_start="s", window_end="e",
        summary={"champion": {"model_version": "4"}, "rows": {"current": 3}}, decision="skipped",
        reason="3 predictions", checked_at="t",
    )  # fmt: skip
    assert (row["champion_version"], row["current_rows"], row["drift_detected"]) == ("4", 3, 0)
    assert row["drifted_features"] == "[]" and row["max_psi"] is None


def test_the_last_retrain_counts_every_signal_of_the_dataset(store):
    def retrain(run: str, dataset: str, end: str, signals: list[str]) -> dict:
        conf = {"dataset": dataset, "signals": signals, "reason": "r", "ds": "2026-01-01"}
        return ms.retrain_row(
            run_id=run, model_name="m", conf=conf, window_end=end, source_dag_run_id="src", requested_at="t"
        )

    assert ms.last_retrain_at(store, "network_security", "2026-01-02T00:00:00+00:00") is None
    ms.write(
        store,
        "retrain_log",
        [
            retrain("drift__a", "network_security", "2026-01-01T10:00:00+00:00", ["drift"]),
            retrain("quality__b", "network_security", "2026-01-01T15:00:00+00:00", ["quality"]),
            retrain("drift__c", "intrusion_flows", "2026-01-01T18:00:00+00:00", ["drift"]),
        ],
    )
    last = ms.last_retrain_at(store, "network_security", "2026-01-02T00:00:00+00:00")
    assert last == dt.datetime(2026, 1, 1, 15, tzinfo=dt.UTC)
    assert ms.last_retrain_at(store, "network_security", "2026-01-01T15:00:00+00:00").hour == 10
    request = ms.retrain_request(store, "quality__b")
    assert request["conf"]["signals"] == ["quality"] and request["signals"] == ["quality"]
    assert ms.retrain_request(store, "nope") is None


@pytest.mark.parametrize("table", sorted(ms.TABLES))
def test_write_of_nothing_writes_nothing(store, table):
    ms.write(store, table, [])
    assert store.table(table) == []


@pytest.mark.parametrize("path", sorted(ms.SQL_DIR.glob("*.sql")), ids=lambda p: p.name)
def test_every_query_runs_on_the_shipped_schema(store, path):
    """Each query of include/sql binds its named parameters (and only those) and runs."""
    import re

    if path.name in ("monitoring_store.sql", "compose_databases.sql"):
        pytest.skip("DDL, run by SQLExecuteQueryOperator")
    names = set(re.findall(r"(?<!:):([a-z_]+)\b", path.read_text()))
    values = {"limit": 5} | {name: "x" for name in names - {"limit"}}
    assert isinstance(ms.query(store, path.stem, **values), list)


def test_one_quality_run_keeps_a_row_per_dataset(store):
    from tasks.quality import QUALITY_CHECK_FIELDS

    def row(dataset: str, decision: str) -> dict:
        required = {"model_name": dataset, "degraded": 0, "reason": "-", "metrics_json": "{}", "checked_at": "now"}
        return {**dict.fromkeys(QUALITY_CHECK_FIELDS), **required, "dag_run_id": "run", "dataset": dataset,
                "decision": decision}  # fmt: skip

    ms.write(store, "quality_check", [row("network_security", "no_degradation")])
    ms.write(store, "quality_check", [row("intrusion_flows", "skipped")])
    ms.write(store, "quality_check", [row("intrusion_flows", "retrain")])  # a retried task overwrites its own
    rows = ms.rows_of_run(store, "quality_check_of_run", "run")
    assert [(r["dataset"], r["decision"]) for r in rows] == [
        ("intrusion_flows", "retrain"),
        ("network_security", "no_degradation"),
    ]


def test_the_hook_store_inserts_through_the_hook_and_queries_through_its_engine(store):
    from types import SimpleNamespace

    hook = SimpleNamespace(insert_rows=store.insert_rows, get_sqlalchemy_engine=lambda: store.engine)
    hook_store = ms.HookStore(hook)
    row = ms.drift_check_row(
        dag_run_id="a", dataset="network_security", model_name="m", window_start="s", window_end="2026-01-01T10:00",
        summary={"drift_detected": True}, decision="drift", reason="r", checked_at="t",
    )  # fmt: skip
    ms.write(hook_store, "drift_check", [row])
    assert ms.drift_history(hook_store, "network_security", "2026-01-01T12:00") == [True]
    assert hook_store.query("SELECT :x + 1 AS y", {"x": 1}) == [{"y": 2}]
