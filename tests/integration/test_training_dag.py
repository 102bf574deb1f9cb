"""The training DAG run with ``dag.test()`` against the real local stack (moto server).

Every case uses its own ``ds`` so the runs cannot see each other's artifacts.
"""

from __future__ import annotations

import io
import threading
import time

import pandas as pd
import pytest

from scripts import services, stack
from scripts.bootstrap import create_buckets
from tasks import storage
from tasks.config import TRAINING_DAG_ID, Settings
from tasks.datagen import generate, publish_drop
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout
from tests.dag_runs import run_dag

pytestmark = pytest.mark.integration

SETTINGS = Settings()


@pytest.fixture(scope="module", autouse=True)
def no_deploy_targets():
    """The data plane is under test here; delivery has its own tests (test_delivery.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_DEPLOY_TARGETS", "")
        yield


SPEC = load_spec("network_security")


def _layout(ds: str, dataset: str = "network_security") -> DayLayout:
    return DayLayout(SETTINGS, load_spec(dataset), ds)


def _put_raw(s3, layout: DayLayout, files: dict[str, bytes]) -> None:
    storage.delete_prefix(s3, layout.raw_prefix.bucket, layout.raw_prefix.key)
    for name, body in files.items():
        storage.put_bytes(s3, layout.raw_prefix.child(name), body)


def _csv(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def _keys(s3, location: storage.S3Location) -> list[str]:
    return storage.list_keys(s3, location.bucket, location.key + "/")


def test_good_drop_produces_snapshot_validation_and_features_idempotently(s3):
    ds = "2026-03-01"
    layout = _layout(ds)
    publish_drop(s3, layout, rows=1500, parts=3)

    first = run_dag(TRAINING_DAG_ID, ds)
    assert first.succeeded, first.task_states
    # The data and model planes all succeed; the gate then takes exactly one of its two
    # branches (which one depends on the registry this private stack has seen so far).
    branches = {"release.candidate", "keep_champion"}
    planes = {k: v for k, v in first.task_states.items() if k not in branches and not k.startswith("release.")}
    assert set(planes.values()) == {"success"}, first.task_states
    assert sorted(first.task_states[b] for b in branches) == ["skipped", "success"]

    ingest = first.outputs["ingest"]
    assert ingest["snapshot_uri"] == layout.snapshot.uri
    assert ingest["rows"] == 1500 and len(ingest["source_files"]) == 3
    assert first.outputs["validate"] == layout.validation_dir.child("result.json").uri
    assert storage.get_json(s3, layout.validation_dir.child("result.json"))["success"] is True
    assert storage.exists(s3, layout.validation_dir.child("report.md"))
    feature_files = {k.rsplit("/", 1)[-1] for k in _keys(s3, layout.features_dir)}
    assert feature_files == {"train.parquet", "test.parquet", "preprocessor.skops", "manifest.json"}
    train = storage.read_parquet(s3, layout.features_dir.child("train.parquet"))
    test = storage.read_parquet(s3, layout.features_dir.child("test.parquet"))
    assert len(train) + len(test) == 1500
    assert list(train.columns) == SPEC.column_names

    second = run_dag(TRAINING_DAG_ID, ds)
    assert second.succeeded, second.task_states
    assert second.outputs["ingest"]["content_hash"] == ingest["content_hash"]
    assert _keys(s3, layout.snapshot_dir) == [layout.snapshot.key, layout.snapshot_manifest.key]
    assert storage.read_parquet(s3, layout.features_dir.child("train.parquet")).equals(train)


def _good_frame(rows: int = 800) -> pd.DataFrame:
    return generate(SPEC, rows, seed=11)


def _missing_column() -> dict[str, bytes]:
    return {"part-0000.csv": _csv(_good_frame().drop(columns=["SSLfinal_State"]))}


def _extra_column() -> dict[str, bytes]:
    frame = _good_frame()
    frame.insert(3, "tracking_pixel", 1)
    return {"part-0000.csv": _csv(frame)}


def _value_out_of_set() -> dict[str, bytes]:
    frame = _good_frame()
    frame.loc[[5, 17, 99], "URL_Length"] = 2
    return {"part-0000.csv": _csv(frame)}


def _non_numeric() -> dict[str, bytes]:
    frame = _good_frame().astype({"Favicon": "object"})
    frame.loc[7, "Favicon"] = "abc"
    return {"part-0000.csv": _csv(frame)}


def _empty_file() -> dict[str, bytes]:
    return {"part-0000.csv": _csv(_good_frame()), "part-0001.csv": b""}


def _header_only() -> dict[str, bytes]:
    return {"part-0000.csv": ",".join(SPEC.column_names).encode() + b"\n"}


def _one_class_label() -> dict[str, bytes]:
    frame = _good_frame()
    frame["Result"] = 1
    return {"part-0000.csv": _csv(frame)}


def _not_csv() -> dict[str, bytes]:
    buffer = io.BytesIO()
    _good_frame().to_parquet(buffer)
    return {"part-0000.csv": buffer.getvalue()}


BAD_DROPS = [
    # (ds, files, failing task, words the reason must contain)
    ("2026-04-01", _missing_column, "validate", ["missing column(s) ['SSLfinal_State']"]),
    ("2026-04-02", _extra_column, "validate", ["unexpected column(s) ['tracking_pixel']"]),
    (
        "2026-04-03",
        _value_out_of_set,
        "validate",
        ["expect_column_values_to_be_in_set(URL_Length)", "3 unexpected", "[2"],
    ),
    ("2026-04-04", _non_numeric, "ingest", ["'Favicon'", "non-numeric", "'abc'"]),
    ("2026-04-05", _empty_file, "ingest", ["part-0001.csv is empty"]),
    ("2026-04-06", _header_only, "validate", ["expect_table_row_count_to_be_between", "observed 0"]),
    (
        "2026-04-07",
        _one_class_label,
        "validate",
        ["expect_column_distinct_values_to_equal_set(Result)", "missing value(s) [-1]"],
    ),
    ("2026-04-08", _not_csv, "ingest", ["not a UTF-8 text CSV"]),
]


@pytest.mark.parametrize(
    ("ds", "make_files", "failing_task", "words"), BAD_DROPS, ids=[c[1].__name__.strip("_") for c in BAD_DROPS]
)
def test_bad_drop_is_rejected_and_quarantined(s3, ds, make_files, failing_task, words, webhook):
    layout = _layout(ds)
    files = make_files()
    _put_raw(s3, layout, files)

    report = run_dag(TRAINING_DAG_ID, ds)

    assert report.state == "failed"
    assert report.task_states[failing_task] == "failed"
    assert report.task_states["transform"] != "success"
    note = storage.get_json(s3, layout.quarantine_dir.child("reason.json"))
    assert note["stage"] == failing_task
    for word in words:
        assert word in note["reason"], note["reason"]
    quarantined = {k.rsplit("/", 1)[-1] for k in _keys(s3, layout.quarantine_dir)}
    assert quarantined - {"reason.json"}, "the offending raw file(s) must be kept in quarantine"
    assert quarantined - {"reason.json"} <= set(files)
    for name in quarantined - {"reason.json"}:
        assert storage.get_bytes(s3, layout.quarantine_dir.child(name)) == files[name]
    # The raw drop stays where upstream put it; nothing claims the day succeeded.
    raw_keys = storage.list_keys(s3, layout.raw_prefix.bucket, layout.raw_prefix.key)
    assert {k.rsplit("/", 1)[-1] for k in raw_keys} == set(files)
    assert _keys(s3, layout.snapshot_dir) == []
    assert _keys(s3, layout.features_dir) == []
    # The failure was alerted, once, naming the task and the reason.
    assert len(webhook) == 1, [(a["task_id"], a["error"][:300]) for a in webhook]
    (alert,) = webhook
    assert (alert["event"], alert["task_id"], alert["run_id"]) == ("task_failed", failing_task, report.run_id)
    assert words[0] in alert["error"]


def test_second_dataset_runs_through_its_own_dag_generated_from_its_spec(s3):
    from tasks.config import training_dag_id

    ds = "2026-05-01"
    layout = _layout(ds, "intrusion_flows")
    publish_drop(s3, layout, rows=600, parts=2)

    report = run_dag(training_dag_id("intrusion_flows"), ds)  # the same body; its dataset is the DAG's default

    assert report.dag_id == "intrusion_flows_training" and report.succeeded, report.task_states
    assert report.outputs["plan_run"]["dataset"] == "intrusion_flows"
    assert report.outputs["ingest"]["snapshot_uri"] == layout.snapshot.uri
    train = storage.read_parquet(s3, layout.features_dir.child("train.parquet"))
    assert list(train.columns) == load_spec("intrusion_flows").column_names
    assert train["flow_duration_s"].dtype == "float64"
    assert set(train["is_attack"].unique()) == {0, 1}


def _task_state(run_id_prefix: str, task_id: str) -> str | None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == TRAINING_DAG_ID, TaskInstance.task_id == task_id)
            .filter(TaskInstance.run_id.like(f"{run_id_prefix}%"))
            .order_by(TaskInstance.start_date.desc())
            .first()
        )
        return None if ti is None else str(ti.state)


def test_emulator_outage_fails_with_the_endpoint_and_recovers_on_retry(s3, local_stack, capfd, monkeypatch):
    ds = "2026-06-01"
    layout = _layout(ds)
    endpoint = local_stack["AWS_ENDPOINT_URL"]
    # A retry delay long enough for the emulator to come back between the two tries.
    monkeypatch.setenv("NS_RETRY_DELAY_SECONDS", "20")
    stack.down(services.Paths.from_env(local_stack), services.Ports.from_env(local_stack), only=["moto"])
    recovered = threading.Event()

    def bring_emulator_back() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _task_state("manual__", "wait_for_drop") != "up_for_retry":
            time.sleep(0.5)
        stack.up(services.Paths.from_env(local_stack), services.Ports.from_env(local_stack), only=["moto"])
        create_buckets(local_stack)  # the emulator keeps state in memory: a restart forgets it
        publish_drop(s3, layout, rows=800)
        recovered.set()

    helper = threading.Thread(target=bring_emulator_back, daemon=True)
    helper.start()
    report = run_dag(TRAINING_DAG_ID, ds)
    helper.join(timeout=5)

    output = capfd.readouterr()
    assert recovered.is_set()
    assert f'Could not connect to the endpoint URL: "{endpoint}' in output.out + output.err
    assert report.succeeded, report.task_states
    assert report.outputs["ingest"]["rows"] == 800


def test_ingest_names_the_endpoint_when_s3_is_unreachable():
    import boto3
    from botocore.config import Config

    from tasks.ingest import ingest_day

    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(storage.StorageUnavailable, match=r"http://127\.0\.0\.1:9 is unreachable"):
        ingest_day(client, _layout("2026-06-02"))


def _all_keys(s3) -> set[str]:
    return {
        f"{bucket}/{key}"
        for bucket in (SETTINGS.raw_bucket, SETTINGS.lake_bucket)
        for key in storage.list_keys(s3, bucket, "")
    }


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        ({"ds": "20260131"}, ["'20260131'"]),
        ({"ds": "2026-W05-2"}, ["'2026-W05-2'"]),
        ({"dataset": "../../etc/passwd"}, ["'../../etc/passwd'", "network_security"]),  # the Param's enum
    ],
    ids=["ds-basic-format", "ds-week-date", "dataset-path"],
)
def test_bad_run_input_is_refused_before_any_s3_write(s3, capfd, conf, words):
    """The Param refuses a malformed ds when the run is created; the plan refuses what gets past it
    (an unknown dataset): either way nothing is read or written and the error names the value."""
    from airflow.sdk.exceptions import ParamValidationError

    publish_drop(s3, _layout("2026-01-31"), rows=600)
    before = _all_keys(s3)
    try:
        report = run_dag(TRAINING_DAG_ID, "2026-01-31", conf=conf)
    except ParamValidationError as refused:
        message = str(refused)
    else:
        assert report.state == "failed" and report.task_states["plan_run"] == "failed"
        assert {s for t, s in report.task_states.items() if t != "plan_run"} <= {"upstream_failed", "skipped"}
        output = capfd.readouterr()
        message = output.out + output.err
        assert message.count("unknown dataset") <= 3, "a bad input fails once, without retries"
    for word in words:
        assert word in message
    assert _all_keys(s3) == before


def test_operators_follow_the_connection_ids_the_settings_name(s3, local_stack, monkeypatch, tmp_path):
    """NS_MONITORING_CONN_ID (like the Variable) moves the DDL task and the task code to another store."""
    import json
    import sqlite3

    other = tmp_path / "other-monitoring.db"
    monkeypatch.setenv("NS_MONITORING_CONN_ID", "other_store")
    monkeypatch.setenv("AIRFLOW_CONN_OTHER_STORE", json.dumps({"conn_type": "sqlite", "host": str(other)}))
    ds = "2026-06-20"
    publish_drop(s3, _layout(ds), rows=800)

    report = run_dag(
        TRAINING_DAG_ID, ds, conf={"force_gate": "reject", "force_reason": "store test: keep the champion"}
    )

    assert report.succeeded, report.task_states
    # The gate kept the champion: the whole release group skips, none of it fails (or retries).
    release_tasks = {k: v for k, v in report.task_states.items() if k.startswith("release.")}
    assert set(release_tasks.values()) == {"skipped"}, release_tasks
    assert report.outputs["plan_run"]["settings"]["monitoring_conn_id"] == "other_store"
    with sqlite3.connect(other) as connection:  # created by ensure_monitoring_store, written by keep_champion
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = connection.execute(
            "SELECT decision FROM promotion_log WHERE dag_run_id = ?", (report.run_id,)
        ).fetchall()
    assert {"promotion_log", "deployment_log", "drift_check", "retrain_log"} <= tables
    assert rows == [("forced_reject",)]
