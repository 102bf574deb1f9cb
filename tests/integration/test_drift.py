"""Monitoring plane: the drift DAG with ``dag.test()`` on the real stack (moto + MLflow).

One story, in order, on a registered model of its own (``NS_MODEL_NAME``) and a day of
its own (2026-09-10), with the prediction log written by the serving app's own writer
(``serving.prediction_log.PredictionLog``) from records the champion scored:

  10:xx  normal traffic, v1     -> check at 11:00: no drift, no trigger
  14:xx  drifted traffic, v1    -> check at 15:00: drift, exactly one training run queued
                                   ten more checks (15:05 ... 15:50): still one run
         the queued run is executed: v2, trained on the drifted day, is champion
  16:xx  normal traffic, v2     -> check at 17:00: drift against v2's reference, but cooldown
                                -> check at 21:30: cooldown over, a second run is queued

Every check reads a 3-hour window (``window_hours`` param), so each sees one traffic hour.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest

from scripts import services
from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID, Settings
from tasks.datagen import DriftKnob, publish_drop
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout
from tests.dag_runs import discard_queued_runs, queued_runs, run_dag, run_queued
from tests.traffic import log_scored_traffic

pytestmark = pytest.mark.integration

MODEL = "ns_drift_test"
SPEC = load_spec("network_security")
DAY = dt.datetime(2026, 9, 10, tzinfo=dt.UTC)
WINDOW = {"window_hours": 3}
DRIFTED = DriftKnob(feature_drift=1.0)
NS = "[network_security]"  # the map index of this dataset's check (the DAG maps over every served dataset)


def at(hour: int, minute: int = 0) -> dt.datetime:
    return DAY.replace(hour=hour, minute=minute)


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", MODEL)
        patch.setenv("NS_DEPLOY_TARGETS", "")  # the drift DAG reads the log; serving is tested elsewhere
        yield


@pytest.fixture(scope="module")
def champion_v1(s3, local_stack):
    """The first champion, trained on the day before."""
    ds = "2026-09-09"
    publish_drop(s3, DayLayout(Settings(), SPEC, ds), rows=2500)
    report = run_dag(TRAINING_DAG_ID, ds)
    assert report.succeeded, report.task_states
    assert report.outputs["release.complete"]["champion_version"] == "1"
    return report


def log_traffic(local_stack, version: str, hour: dt.datetime, rows: int, seed: int, knob=None) -> None:
    """Score generated records with ``version`` and log them as the served app does, within ``hour``."""
    s3 = services.s3_client(local_stack)
    log_scored_traffic(s3, local_stack["MLFLOW_TRACKING_URI"], SPEC, MODEL, version, hour, rows, seed, knob)


def check(when: dt.datetime, **params):
    report = run_dag(DRIFT_DAG_ID, when, conf={**WINDOW, **params})
    return report, report.outputs.get(f"decide_retraining{NS}:decision")


def drift_checks(local_stack) -> list[dict]:
    with sqlite3.connect(local_stack["NS_MONITORING_DB"]) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT * FROM drift_check WHERE model_name = ? ORDER BY window_end, checked_at", (MODEL,)
        )
        return [dict(row) for row in rows]


def retrains(local_stack) -> list[dict]:
    with sqlite3.connect(local_stack["NS_MONITORING_DB"]) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM retrain_log WHERE model_name = ? ORDER BY window_end", (MODEL,))
        return [dict(row) for row in rows]


def training_runs_queued() -> list[dict]:
    return [run for run in queued_runs(TRAINING_DAG_ID) if run["run_id"].startswith("drift__")]


def test_a_window_with_too_few_rows_is_skipped_with_the_reason(champion_v1, local_stack):
    report, decision = check(at(3))

    assert report.succeeded, report.task_states
    assert report.task_states[f"check_drift{NS}"] == "skipped"
    assert decision is None and report.task_states[f"trigger_retraining{NS}"] == "skipped"
    row = drift_checks(local_stack)[-1]
    assert row["decision"] == "skipped" and row["window_end"].startswith("2026-09-10T03:00")
    assert "0 predictions of champion v1 in the window" in row["reason"]
    assert "minimum 500" in row["reason"]


def test_no_drift_no_trigger(champion_v1, s3, local_stack, webhook):
    log_traffic(local_stack, "1", at(10), rows=800, seed=201)

    report, decision = check(at(11))

    assert report.succeeded, report.task_states
    assert decision["outcome"] == "no_drift" and not decision["trigger"]
    assert report.task_states[f"trigger_retraining{NS}"] == "skipped"
    summary = report.outputs[f"check_drift{NS}"]
    assert summary["rows"] == {"current": 800, "evaluated": 800, "reference": 2500}
    assert summary["max_psi"] < 0.25 and summary["champion"]["model_version"] == "1"
    for uri in (summary["report_uri"], summary["summary_uri"]):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        assert key.startswith(f"drift/network_security/{report.run_id.replace(':', '_').replace('+', '_')}/")
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    assert training_runs_queued() == [] and webhook == []  # no drift, no alert
    # The task's extra links in the UI: the report over HTTP and the monitoring run.
    import httpx

    assert report.outputs[f"check_drift{NS}:_link_EvidentlyReportLink"] == summary["report_url"]
    assert report.outputs[f"check_drift{NS}:_link_MLflowRunLink"] == summary["mlflow_run_url"]
    page = httpx.get(summary["report_url"], timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    bucket, key = summary["report_uri"].removeprefix("s3://").split("/", 1)
    assert page.content == s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # the same Evidently report
    assert summary["mlflow_run_url"].startswith(local_stack["MLFLOW_TRACKING_URI"] + "/#/experiments/")


def test_drift_queues_exactly_one_training_run_with_its_conf(champion_v1, s3, local_stack, webhook):
    publish_drop(s3, DayLayout(Settings(), SPEC, "2026-09-10"), rows=2500, knob=DRIFTED)  # labelled drifted day
    log_traffic(local_stack, "1", at(14), rows=800, seed=202, knob=DRIFTED)

    report, decision = check(at(15))

    assert report.succeeded, report.task_states
    assert decision["outcome"] == "retrain" and report.task_states[f"trigger_retraining{NS}"] == "success"
    summary = report.outputs[f"check_drift{NS}"]
    (run,) = training_runs_queued()
    assert run["run_id"] == "drift__network_security__2026-09-10T15:00:00"
    conf = run["conf"]
    assert conf["ds"] == "2026-09-10" and conf["window_days"] == 1 and conf["dataset"] == "network_security"
    assert conf["drift_report_uri"] == summary["report_uri"]
    assert conf["max_psi"] == summary["max_psi"] >= 0.25
    assert conf["drifted_features"] == summary["drifted_features"] != []
    assert conf["reason"].startswith("drift: max PSI")
    assert drift_checks(local_stack)[-1]["triggered_run_id"] == run["run_id"]
    (retrain,) = retrains(local_stack)  # what the cooldown counts from, whatever the signal
    assert (retrain["run_id"], retrain["signals"]) == (run["run_id"], '["drift"]')
    assert json.loads(retrain["conf_json"]) == conf
    (alert,) = webhook
    assert alert["event"] == "drift_retraining_triggered" and alert["training_run_id"] == run["run_id"]
    assert alert["drifted_features"] == summary["drifted_features"] and alert["report_url"] == summary["report_url"]


def test_ten_checks_while_the_retrain_is_queued_trigger_nothing(local_stack):
    outcomes = [check(at(15, minute))[1]["outcome"] for minute in range(5, 55, 5)]

    assert outcomes == ["training_active"] * 10
    assert len(training_runs_queued()) == 1


def test_the_triggered_run_retrains_and_the_new_reference_holds_with_cooldown(local_stack):
    from mlflow import MlflowClient

    from tasks.tracking import alias_version

    (executed,) = run_queued(TRAINING_DAG_ID)
    queued, report = executed
    # dag.test() runs the queued run's conf as a manual__ run at the same logical date (as make run does).
    assert queued["run_id"] == "drift__network_security__2026-09-10T15:00:00"
    assert report.run_id.startswith("manual__") and report.logical_date == queued["logical_date"]
    assert report.succeeded, report.task_states
    assert report.outputs["plan_run"]["trigger"]["signals"] == ["drift"]
    client = MlflowClient(local_stack["MLFLOW_TRACKING_URI"])
    assert alias_version(client, MODEL, "champion") == "2"
    training = client.get_run(report.outputs["train"]["run_id"])
    assert training.data.tags.get("trigger_reason", "").startswith("drift: max PSI")

    # v2 was trained on the drifted day: normal traffic is drift against its reference,
    # but the cooldown (6 h after the 15:00 trigger) holds it back.
    log_traffic(local_stack, "2", at(16), rows=800, seed=203)
    report, decision = check(at(17))
    assert report.outputs[f"check_drift{NS}"]["champion"]["model_version"] == "2"
    assert report.outputs[f"check_drift{NS}"]["drift_detected"]
    assert decision["outcome"] == "cooldown" and training_runs_queued() == []

    report, decision = check(at(21, 30), window_hours=8)
    assert decision["outcome"] == "retrain"
    assert [r["run_id"] for r in training_runs_queued()] == ["drift__network_security__2026-09-10T21:30:00"]
    discard_queued_runs(TRAINING_DAG_ID)


def test_missing_champion_fails_clearly_without_retries(champion_v1, local_stack, monkeypatch, capfd):
    monkeypatch.setenv("NS_MODEL_NAME", "ns_drift_never_trained")

    report, decision = check(at(11), dataset="network_security")  # named: checked even without a champion

    assert report.state == "failed"
    assert [state for task, state in report.task_states.items() if task.startswith("check_drift")] == ["failed"]
    assert decision is None
    output = capfd.readouterr()
    assert "'ns_drift_never_trained' has no champion" in output.out + output.err
    assert "Run network_security_training first" in output.out + output.err
