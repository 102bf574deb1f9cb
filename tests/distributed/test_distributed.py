"""Distributed mode run for real: CeleryExecutor, Postgres, Redis, the triggerer, two workers.

``scripts/distributed`` starts a fresh stack on loopback (its own Postgres databases, its own
Redis database number, its own state dir) and every run below goes through the public REST API,
the scheduler, the Redis broker and the celery workers, never ``dag.test()``:

1. a training run waits for a drop that is not there yet: its S3 sensor defers to the triggerer,
   the drop is published, the run succeeds, every task ran on a celery worker, and the promotion
   landed in the Postgres monitoring store;
2. drifted traffic in the prediction log + a drift check through the API: the check's
   TriggerDagRunOperator creates a training run that the scheduler then executes to success;
3. the worker running ``train`` is SIGKILLed mid-task: the task is retried on the other worker
   and the run still succeeds.

The tests share one stack and build on each other (2 needs the champion of 1), in file order.
Run with ``python -m scripts.distributed test`` or ``pytest -m distributed tests/distributed``.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts import distributed, services
from scripts.airflow_api import AirflowApi
from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID, Settings
from tasks.datagen import DriftKnob, publish_drop
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout
from tests.traffic import log_scored_traffic

pytestmark = pytest.mark.distributed

SPEC = load_spec("network_security")
MODEL = "network_security"
ROWS = 2000
FIRST_DAY = "2026-06-01"  # test 1: the first champion
DRIFTED_DAY = "2026-06-02"  # test 2: labelled drifted day, drifted traffic at 14:xx, check at 15:00
KILL_DAY = "2026-06-03"  # test 3
CHECK_AT = dt.datetime(2026, 6, 2, 15, tzinfo=dt.UTC)
RUN_TIMEOUT = 480.0


@dataclass
class Stack:
    config: distributed.Config
    env: dict[str, str]
    api: AirflowApi
    s3: Any

    @property
    def worker_hostnames(self) -> set[str]:
        return set(self.config.worker_hostnames.values())

    def monitoring(self, sql: str, *args: Any) -> list[tuple]:
        return self.query("monitoring", sql, *args)

    def query(self, database: str, sql: str, *args: Any) -> list[tuple]:
        connection = distributed.pg_connect(self.config, self.config.databases[database])
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchall()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def dist(request) -> Stack:

    config = distributed.Config.from_env()
    problem = distributed.preflight(config)
    if problem:
        pytest.fail(problem, pytrace=False)
    alive = distributed.running(config)
    if alive:
        pytest.fail(
            f"services are running under {config.paths.state_dir} ({', '.join(alive)}); the test starts a fresh "
            "stack there: run `python -m scripts.distributed down` first",
            pytrace=False,
        )
    failed_before = request.session.testsfailed
    try:
        started = time.monotonic()
        env = distributed.up(config, fresh=True)
        print(f"distributed stack up in {time.monotonic() - started:.0f}s")
        yield Stack(config, env, distributed.api(config), services.s3_client(env))
    finally:
        failed = request.session.testsfailed > failed_before
        if failed:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(
                    f"\ndistributed stack logs: {config.where_logs()}; its databases are kept for a look "
                    "(`python -m scripts.distributed down --drop` drops them)",
                    red=True,
                )
        if not os.environ.get("NS_DIST_KEEP"):
            # The shared Postgres and Redis outlive the run: a passing run leaves nothing in them.
            distributed.down(config, drop=not failed)


def _layout(ds: str) -> DayLayout:
    return DayLayout(Settings(), SPEC, ds)


def _task_log_dir(dist: Stack, run_id: str, task_id: str) -> Path:
    return (
        dist.config.paths.airflow_home
        / "logs"
        / f"dag_id={TRAINING_DAG_ID}"
        / f"run_id={run_id}"
        / f"task_id={task_id}"
    )


def _celery_tasks(dist: Stack, run_id: str) -> dict[str, str]:
    """task id -> status in the Celery result backend of the celery task that ran its latest try."""
    rows = dist.query(
        "airflow",
        "SELECT ti.task_id, m.status FROM task_instance ti JOIN celery_taskmeta m ON m.task_id = ti.external_executor_id"
        " WHERE ti.run_id = %s",
        run_id,
    )
    return dict(rows)


def _wait_for_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path} within {timeout:.0f}s")
        time.sleep(0.3)


def _ran_on_workers(dist: Stack, tis: dict[str, dict]) -> dict[str, str]:
    """task id -> hostname of every task instance that ran; asserts each ran on one of the celery workers."""
    ran = {task_id: ti["hostname"] for task_id, ti in tis.items() if ti.get("hostname")}
    assert ran, "no task instance recorded a hostname"
    strangers = {task_id: host for task_id, host in ran.items() if host not in dist.worker_hostnames}
    assert not strangers, f"tasks ran outside the celery workers {dist.worker_hostnames}: {strangers}"
    succeeded = {task_id for task_id, ti in tis.items() if ti["state"] == "success"}
    assert succeeded <= set(ran), f"successful tasks without a worker hostname: {succeeded - set(ran)}"
    return ran


def test_training_run_defers_to_the_triggerer_and_runs_on_celery_workers(dist):
    run_id = dist.api.trigger(
        TRAINING_DAG_ID,
        conf={"ds": FIRST_DAY},
        run_id=f"dist_first__{FIRST_DAY}",
        logical_date=dt.datetime.fromisoformat(FIRST_DAY).replace(tzinfo=dt.UTC),
    )
    # No drop yet: the sensor pokes once on its worker, finds nothing and defers to the triggerer.
    dist.api.wait_for_task(TRAINING_DAG_ID, run_id, "wait_for_drop", lambda ti: ti["state"] == "deferred", 240)
    publish_drop(dist.s3, _layout(FIRST_DAY), rows=ROWS)

    sensor_states: list[str] = []
    run = dist.api.wait_for_run(
        TRAINING_DAG_ID,
        run_id,
        RUN_TIMEOUT,
        observe=lambda tis: sensor_states.append(tis["wait_for_drop"]["state"]) if "wait_for_drop" in tis else None,
    )
    tis = dist.api.task_instances(TRAINING_DAG_ID, run_id)
    states = {task_id: ti["state"] for task_id, ti in tis.items()}

    assert run["state"] == "success", states
    assert "deferred" in sensor_states and states["wait_for_drop"] == "success"
    # The triggerer, not a worker, waited: the sensor is resumed in the same try it deferred in.
    assert tis["wait_for_drop"]["try_number"] == 1
    trigger_logs = list(_task_log_dir(dist, run_id, "wait_for_drop").glob("attempt=1.log.trigger.*.log"))
    assert trigger_logs and "Trigger fired event" in trigger_logs[0].read_text(errors="replace")
    ran = _ran_on_workers(dist, tis)
    assert set(ran.values()) <= dist.worker_hostnames
    # ... as Celery tasks: each one's celery task id is in the result backend (the Airflow Postgres database).
    celery = _celery_tasks(dist, run_id)
    assert set(ran) <= set(celery), f"not sent through Celery: {set(ran) - set(celery)}"
    assert states["release.complete"] == "success" and states["keep_champion"] == "skipped"
    assert dist.api.xcom(TRAINING_DAG_ID, run_id, "release.complete")["champion_version"] == "1"
    # The monitoring store is Postgres: the DDL ran there and the gate decision is in it.
    rows = dist.monitoring("SELECT model_version, decision FROM promotion_log WHERE dag_run_id = %s", run_id)
    assert rows == [("1", "promote")]
    if "ec2" in dist.config.deploy_targets:
        assert states["release.deploy_candidate"] == "success" and states["release.complete"] == "success"
        deployed = dist.monitoring("SELECT target, status FROM deployment_log WHERE dag_run_id = %s", run_id)
        assert deployed == [("ec2", "deployed")]


def _log_traffic(dist: Stack, version: str, hour: dt.datetime, rows: int, seed: int, knob=None) -> None:
    """Score generated records with ``version`` and log them as the model server does."""
    log_scored_traffic(dist.s3, dist.env["MLFLOW_TRACKING_URI"], SPEC, MODEL, version, hour, rows, seed, knob)


def test_drift_check_triggers_a_training_run_that_the_scheduler_executes(dist):
    from mlflow import MlflowClient

    from tasks.tracking import alias_version

    client = MlflowClient(dist.env["MLFLOW_TRACKING_URI"])
    champion = alias_version(client, MODEL, "champion")
    assert champion, "no champion: test_training_run_defers_to_the_triggerer_and_runs_on_celery_workers must pass first"
    drifted = DriftKnob(feature_drift=1.0)
    publish_drop(dist.s3, _layout(DRIFTED_DAY), rows=ROWS, knob=drifted)  # the labelled day to retrain on
    _log_traffic(dist, champion, CHECK_AT - dt.timedelta(hours=1), rows=800, seed=202, knob=drifted)

    check_id = dist.api.trigger(DRIFT_DAG_ID, conf={"window_hours": 3}, logical_date=CHECK_AT)
    check = dist.api.wait_for_run(DRIFT_DAG_ID, check_id, 300)
    check_tis = dist.api.task_instances(DRIFT_DAG_ID, check_id)
    check_states = {task_id: ti["state"] for task_id, ti in check_tis.items()}
    assert check["state"] == "success", check_states
    # The drift DAG maps over the datasets with a champion: network_security alone here (map index 0).
    decision = dist.api.xcom(DRIFT_DAG_ID, check_id, "decide_retraining", key="decision", map_index=0)
    assert decision["outcome"] == "retrain", decision
    assert check_states["trigger_retraining"] == "success" and check_states["no_retraining"] == "skipped"
    _ran_on_workers(dist, check_tis)

    retrain_id = decision["retrain"]["run_id"]
    assert retrain_id == f"drift__network_security__{CHECK_AT:%Y-%m-%dT%H:%M:%S}"
    created = {run["dag_run_id"]: run for run in dist.api.dag_runs(TRAINING_DAG_ID)}
    assert retrain_id in created and created[retrain_id]["conf"]["ds"] == DRIFTED_DAY
    run = dist.api.wait_for_run(TRAINING_DAG_ID, retrain_id, RUN_TIMEOUT)
    tis = dist.api.task_instances(TRAINING_DAG_ID, retrain_id)
    assert run["state"] == "success", {task_id: ti["state"] for task_id, ti in tis.items()}
    _ran_on_workers(dist, tis)
    training = client.get_run(dist.api.xcom(TRAINING_DAG_ID, retrain_id, "train")["run_id"])
    assert training.data.tags["trigger_reason"].startswith("drift: max PSI")
    assert training.data.tags["ds"] == DRIFTED_DAY
    rows = dist.monitoring(
        "SELECT decision, triggered_run_id, drift_detected FROM drift_check WHERE dag_run_id = %s", check_id
    )
    assert rows == [("retrain", retrain_id, 1)]
    logged = dist.monitoring("SELECT signals, window_end FROM retrain_log WHERE run_id = %s", retrain_id)
    assert logged == [('["drift"]', CHECK_AT.isoformat())]  # the one cooldown counts from here


def test_a_worker_killed_mid_task_loses_no_run(dist):
    publish_drop(dist.s3, _layout(KILL_DAY), rows=ROWS)
    run_id = dist.api.trigger(
        TRAINING_DAG_ID,
        conf={"ds": KILL_DAY},
        run_id=f"dist_kill__{KILL_DAY}",
        logical_date=dt.datetime.fromisoformat(KILL_DAY).replace(tzinfo=dt.UTC),
    )
    train = dist.api.wait_for_task(
        TRAINING_DAG_ID,
        run_id,
        "train",
        lambda ti: ti["state"] == "running" and ti.get("hostname") in dist.worker_hostnames,
        RUN_TIMEOUT,
    )
    victim_host = train["hostname"]
    victim = next(name for name, host in dist.config.worker_hostnames.items() if host == victim_host)
    # Mid-task: the candidates are scored (mapped tasks), the best is being refitted in the open parent run.
    attempt_log = _task_log_dir(dist, run_id, "train") / f"attempt={train['try_number']}.log"
    _wait_for_log(attempt_log, '"event":"refitting ', 180)
    assert dist.api.task_instances(TRAINING_DAG_ID, run_id)["train"]["state"] == "running"
    pid = distributed.kill(dist.config, victim)
    print(f"SIGKILLed {victim} (pid {pid}, {victim_host}) while it ran train try {train['try_number']}")
    try:
        run = dist.api.wait_for_run(TRAINING_DAG_ID, run_id, RUN_TIMEOUT + dist.config.heartbeat_timeout)
        tis = dist.api.task_instances(TRAINING_DAG_ID, run_id)
        states = {task_id: ti["state"] for task_id, ti in tis.items()}
        assert run["state"] == "success", states
        tries = dist.api.tries(TRAINING_DAG_ID, run_id, "train")
        summary = [(t["try_number"], t["state"], t["hostname"]) for t in tries]
        assert len(tries) >= 2, summary
        assert tries[0]["try_number"] == train["try_number"] and tries[0]["hostname"] == victim_host, summary
        assert tries[0]["state"] != "success", summary
        assert tries[-1]["state"] == "success", summary
        assert tries[-1]["hostname"] in dist.worker_hostnames - {victim_host}, summary
        _ran_on_workers(dist, tis)
    finally:
        distributed.start(dist.config, [victim])  # leave the stack as it was: two workers
    assert distributed.celery_ping(dist.config, [distributed.celery_node(dist.config, victim)])
