"""The run-time adapters: domain errors as Airflow's, and the monitoring store on a real SQL hook."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from network_security import runtime
from tasks import monitoring_store
from tasks.delivery import NothingReleased, SmokeRecordsMissing, TargetNotSelected
from tasks.drift import DriftError, NotEnoughData
from tasks.plan import PlanError
from tasks.registry import ChampionMoved, NothingToRollBack


@pytest.mark.parametrize(
    ("error", "airflow_error"),
    [
        (PlanError("ds must be a day written YYYY-MM-DD"), AirflowFailException),  # bad input: no retries
        (DriftError("no champion"), AirflowFailException),
        (NothingToRollBack("no previous_champion"), AirflowFailException),
        (ChampionMoved("champion is v2 now, this run read v1"), AirflowFailException),  # no overwrite, no retry
        (SmokeRecordsMissing("the held-out split is not in S3"), AirflowFailException),
        (NotEnoughData("3 predictions", {}), AirflowSkipException),  # nothing to decide on
        (TargetNotSelected("'ec2' is not in deploy_targets"), AirflowSkipException),
        (NothingReleased("nothing deployed"), AirflowSkipException),
    ],
)
def test_domain_errors_become_airflows(error, airflow_error):
    with pytest.raises(airflow_error, match=str(error).split(":")[0]):
        with runtime.failures():
            raise error


def test_other_errors_stay_as_they_are_and_are_retried():
    with pytest.raises(ConnectionError):
        with runtime.failures():
            raise ConnectionError("S3 is unreachable")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The store on Airflow's SQLite hook of an environment connection, with the shipped DDL."""
    import sqlite3

    path = tmp_path / "monitoring.db"
    sqlite3.connect(path).executescript((monitoring_store.SQL_DIR / "monitoring_store.sql").read_text())
    monkeypatch.setenv("AIRFLOW_CONN_TEST_STORE", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return monitoring_store.HookStore(runtime.connection("test_store").get_hook())


def test_the_hook_store_upserts_and_queries_with_named_parameters(store):
    def check(run: str, end: str, detected: bool) -> dict:
        return monitoring_store.drift_check_row(
            dag_run_id=run, dataset="network_security", model_name="m", window_start="s", window_end=end,
            summary={"drift_detected": detected}, decision="no_drift", reason="r", checked_at="t",
        )  # fmt: skip

    monitoring_store.write(store, "drift_check", [check("a", "2026-01-01T10:00", True)])
    monitoring_store.write(
        store, "drift_check", [check("a", "2026-01-01T10:00", False), check("b", "2026-01-01T11:00", True)]
    )
    assert monitoring_store.drift_history(store, "network_security", "2026-01-01T12:00") == [True, False]
    assert monitoring_store.rows_of_run(store, "drift_check_of_run", "a")[0]["drift_detected"] == 0


def test_a_step_gets_the_plan_the_clients_it_names_and_its_values_in_order(monkeypatch):
    from types import SimpleNamespace

    built = []

    def provider(name):
        return lambda plan: built.append(name) or f"{name}-client"

    monkeypatch.setattr(runtime, "PROVIDED", {name: provider(name) for name in ("store", "server", "ssm", "region")})
    plan = SimpleNamespace(deploy_targets=("local",), settings=SimpleNamespace(deploy_targets="local"))

    def step(plan, store, chosen, deployed, *, server, ssm, region, fault=None):
        return plan, store, chosen, deployed, server, ssm, region, fault

    got = runtime.call(step, plan, "c", "d", fault="f")
    assert got == (plan, "store-client", "c", "d", "server-client", None, "region-client", "f")
    assert sorted(built) == ["region", "server", "store"]  # ssm: the plan does not ship to EC2
    with pytest.raises(ValueError, match="zip"):  # more upstream values than the step takes
        runtime.call(step, plan, "c", "d", "e")
