"""Prediction log: JSON lines in hour partitions, written off the request path, nothing lost to a flaky S3."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from tests.serving.conftest import LOG_BUCKET, Registry, make_log, record_of

KEY = re.compile(r"^predictions/dt=(\d{4}-\d{2}-\d{2})/(\d{2})/(\d{13})-[0-9a-f]{32}\.jsonl$")


def _objects(client: Any, bucket: str = LOG_BUCKET, prefix: str = "predictions/") -> dict[str, list[dict[str, Any]]]:
    """Every JSON-lines object under ``prefix``: key -> its records."""
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        item["Key"]: [
            json.loads(line)
            for line in client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode().splitlines()
        ]
        for item in listing
    }


def _records(n: int, start: int = 0, timestamp: str | None = None) -> list[dict[str, Any]]:
    moment = timestamp or dt.datetime.now(dt.UTC).isoformat()
    return [{"request_id": f"r{i}", "timestamp": moment, "x": i} for i in range(start, start + n)]


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_every_prediction_is_in_s3_after_shutdown(settings, aws: Any, auth, registry: Registry, spec):
    # A long interval: only the shutdown flush can have written them.
    app = create_app(settings, prediction_log=make_log(aws, flush_seconds=60))
    rows = registry.features.iloc[:12]
    with TestClient(app) as api:
        singles = [api.post("/predict", json=record_of(rows, i), headers=auth).json() for i in range(7)]
        batch = api.post("/predict/batch", json={"records": [record_of(rows, i) for i in range(7, 12)]}, headers=auth)
        assert _objects(aws) == {}
    answers = singles + batch.json()["predictions"]

    objects = _objects(aws)
    logged = {record["request_id"]: record for records in objects.values() for record in records}

    assert sum(len(records) for records in objects.values()) == len(answers) == 12
    assert set(logged) == {a["request_id"] for a in answers}
    for i, answer in enumerate(answers):
        record = logged[answer["request_id"]]
        assert {name: record[name] for name in spec.feature_names} == record_of(rows, i)
        assert (record["label"], record["probability"]) == (answer["label"], answer["probability"])
        assert (record["model_name"], record["model_version"]) == (registry.model_name, "1")
    for key, records in objects.items():
        day, hour, _ = KEY.match(key).groups()
        for record in records:
            moment = dt.datetime.fromisoformat(record["timestamp"])
            assert moment.utcoffset() == dt.timedelta(0)
            assert (f"{moment:%Y-%m-%d}", f"{moment:%H}") == (day, hour)
    assert app.state.prediction_log.stats() == {
        "enqueued": 12,
        "written": 12,
        "batches_written": len(objects),
        "write_failures": 0,
        "dropped": 0,
        "buffered": 0,
    }


def test_records_go_to_the_partition_of_their_own_timestamp(aws: Any):
    log = make_log(aws)
    log.log(_records(2, 0, "2024-03-09T23:59:59.900+00:00"))
    log.log(_records(3, 2, "2024-03-10T02:00:00.100+02:00"))  # 00:00 UTC, the next day
    log.close()

    by_partition = {
        KEY.match(key).groups()[:2]: sorted(r["x"] for r in records) for key, records in _objects(aws).items()
    }

    assert by_partition == {("2024-03-09", "23"): [0, 1], ("2024-03-10", "00"): [2, 3, 4]}


def test_a_full_batch_is_written_without_waiting_for_the_interval(aws: Any):
    log = make_log(aws, batch_size=5, flush_seconds=60)
    log.start()
    try:
        log.log(_records(4))
        time.sleep(0.2)
        assert log.stats()["written"] == 0
        log.log(_records(1, 4))
        assert _wait_for(lambda: log.stats()["written"] == 5)
    finally:
        log.close()
    assert [len(records) for records in _objects(aws).values()] == [5]


def test_a_partial_batch_is_written_after_the_interval(aws: Any):
    log = make_log(aws, batch_size=500, flush_seconds=0.1)
    log.start()
    try:
        log.log(_records(3))
        assert _wait_for(lambda: log.stats()["written"] == 3)
    finally:
        log.close()


def test_failed_writes_are_retried_until_s3_recovers(aws: Any):
    real_put, calls = aws.put_object, {"n": 0}

    def flaky_put(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ConnectionError("S3 is down")
        return real_put(**kwargs)

    aws.put_object = flaky_put
    log = make_log(aws, batch_size=4)
    log.start()
    log.log(_records(10))
    log.close()

    written = [record["x"] for records in _objects(aws).values() for record in records]
    stats = log.stats()
    assert sorted(written) == list(range(10))  # nothing lost, nothing twice
    assert (stats["write_failures"], stats["dropped"], stats["written"]) == (3, 0, 10)


def test_a_missing_bucket_keeps_the_records_until_it_exists(aws: Any):
    log = make_log(aws, bucket="created-later")
    log.start()
    try:
        log.log(_records(6))
        assert _wait_for(lambda: log.stats()["write_failures"] >= 2)
        assert log.stats()["buffered"] == 6
        aws.create_bucket(Bucket="created-later")
        assert log.flush(timeout=5)
    finally:
        log.close()

    written = [r["x"] for records in _objects(aws, bucket="created-later").values() for r in records]
    assert sorted(written) == list(range(6))
    assert log.stats()["dropped"] == 0


def test_an_overfull_buffer_drops_the_oldest_and_counts_them(aws: Any, caplog: pytest.LogCaptureFixture):
    aws.delete_bucket(Bucket=LOG_BUCKET)  # S3 "unavailable": nothing can be written
    log = make_log(aws, max_buffer=10, batch_size=4)
    log.log(_records(7))
    log.log(_records(18, 7))  # writer not started yet: the overflow is exactly 15
    assert log.stats()["dropped"] == 15
    log.start()
    assert _wait_for(lambda: log.stats()["write_failures"] >= 1)
    log.log(_records(2, 25))  # the failed batch goes back to the front, then the oldest 2 are dropped
    assert _wait_for(lambda: log.stats()["dropped"] == 17)
    aws.create_bucket(Bucket=LOG_BUCKET)
    log.close()

    written = sorted(r["x"] for records in _objects(aws).values() for r in records)
    assert written == list(range(17, 27))  # the newest 10
    assert log.stats()["dropped"] == 17
    assert log.stats()["written"] == 10
    assert "prediction log buffer full (10 records): dropped the 15 oldest; 15 dropped in total" in caplog.text


def test_records_still_unwritable_at_shutdown_are_counted_as_dropped(aws: Any, caplog: pytest.LogCaptureFixture):
    log = make_log(aws, bucket="never-created")
    log.start()
    log.log(_records(4))
    started = time.monotonic()
    log.close(timeout=0.3)

    assert time.monotonic() - started < 7
    assert log.stats()["dropped"] == 4 and log.stats()["written"] == 0
    assert "4 records could not be written to s3://never-created/predictions before shutdown" in caplog.text


def test_logging_is_off_the_request_path(settings, aws: Any, auth, registry: Registry):
    real_put = aws.put_object

    def slow_put(**kwargs: Any) -> Any:
        time.sleep(1.0)
        return real_put(**kwargs)

    aws.put_object = slow_put
    with TestClient(create_app(settings, prediction_log=make_log(aws, batch_size=1))) as api:
        started = time.monotonic()
        for i in range(3):
            assert api.post("/predict", json=record_of(registry.features, i), headers=auth).status_code == 200
        elapsed = time.monotonic() - started
        api.app.state.prediction_log.close(timeout=0.1)  # do not wait for the slow writes

    assert elapsed < 1.0


def test_the_log_writes_again_when_the_app_starts_again(settings, aws: Any, auth, registry: Registry):
    app = create_app(settings, prediction_log=make_log(aws, flush_seconds=60))
    for run in range(2):
        with TestClient(app) as api:
            assert api.post("/predict", json=record_of(registry.features, run), headers=auth).status_code == 200

    assert sum(len(records) for records in _objects(aws).values()) == 2
    assert app.state.prediction_log.stats()["dropped"] == 0
