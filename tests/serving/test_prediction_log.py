"""Prediction log: JSON lines per model and hour, off the request path, nothing answered 200 lost.

In-process moto here; the same properties against a real uvicorn process and a moto server
paused with SIGSTOP or a server killed with SIGKILL are in ``test_prediction_log_faults.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serving.app import create_app
from serving.prediction_log import FRAME, FRAME_MAGIC, IndexedIds, LogChunk, LogUnavailable, RecordEncoder
from tests.serving.conftest import LOG_BUCKET, Registry, make_log, record_of, serving_client

KEY = re.compile(r"^predictions/(?:(\w+)/)?dt=(\d{4}-\d{2}-\d{2})/(\d{2})/(\d{13})-[0-9a-f]{12}-\d{6}\.jsonl$")
ENCODER = RecordEncoder(["x", "y"])


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


def _written(client: Any, bucket: str = LOG_BUCKET) -> list[int]:
    return sorted(record["x"] for records in _objects(client, bucket).values() for record in records)


def _records(n: int, start: int = 0, timestamp: str | None = None) -> list[dict[str, Any]]:
    moment = timestamp or dt.datetime.now(dt.UTC).isoformat()
    return [{"request_id": f"r{i}", "timestamp": moment, "model_name": "m", "x": i} for i in range(start, start + n)]


def _chunk(n: int, start: int = 0, model: str = "m") -> LogChunk:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    ids = [f"r{i}" for i in range(start, start + n)]
    rows = [(i, -i) for i in range(start, start + n)]
    return LogChunk(ENCODER, model, "1", now, ids, rows, [1] * n, [0.5] * n)


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_records_keep_the_contract_keys_in_order_and_leave_out_unused_ones():
    plain = ENCODER.encode(_chunk(1))
    chunk = _chunk(2)
    chunk.role, chunk.shadow_version = "canary", "7"
    chunk.shadow_labels, chunk.shadow_probabilities = [1, None], [0.25, None]
    released = [json.loads(line) for line in ENCODER.encode(chunk).splitlines()]

    assert list(json.loads(plain)) == [
        "request_id",
        "timestamp",
        "model_name",
        "model_version",
        "x",
        "y",
        "label",
        "probability",
    ]
    assert list(released[0])[-4:] == ["role", "shadow_model_version", "shadow_label", "shadow_probability"]
    assert (released[0]["shadow_label"], released[1]["role"]) == (1, "canary")
    assert "shadow_label" not in released[1]  # the candidate gave no answer for it: left out, as unused keys are
    assert list(IndexedIds("abc", 3)) == ["abc:0", "abc:1", "abc:2"] and IndexedIds("abc", 3)[-1] == "abc:2"
    # A large chunk is encoded in slices: the same lines, in order.
    large = _chunk(2500)
    large.request_ids = IndexedIds("big", 2500)
    lines = [json.loads(line) for line in ENCODER.encode(large).splitlines()]
    assert [line["request_id"] for line in lines] == list(IndexedIds("big", 2500))
    assert [(line["x"], line["y"]) for line in lines] == [(i, -i) for i in range(2500)]


def test_every_prediction_is_in_s3_after_shutdown(settings, aws: Any, auth, registry: Registry, spec):
    # A long interval: only the shutdown flush can have written them.
    app = create_app(settings, prediction_log=make_log(aws, flush_seconds=60))
    rows = registry.features.iloc[:12]
    with serving_client(app) as api:
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
        assert list(record)[:4] == ["request_id", "timestamp", "model_name", "model_version"]
        assert list(record)[4:-2] == spec.feature_names and list(record)[-2:] == ["label", "probability"]
        assert {name: record[name] for name in spec.feature_names} == record_of(rows, i)
        assert (record["label"], record["probability"]) == (answer["label"], answer["probability"])
        assert (record["model_name"], record["model_version"]) == (registry.model_name, "1")
    for key, records in objects.items():
        model, day, hour, _ = KEY.match(key).groups()
        assert model == registry.model_name
        for record in records:
            moment = dt.datetime.fromisoformat(record["timestamp"])
            assert moment.utcoffset() == dt.timedelta(0)
            assert (f"{moment:%Y-%m-%d}", f"{moment:%H}") == (day, hour)
    stats = app.state.prediction_log.stats()
    assert (stats["enqueued"], stats["written"], stats["dropped"], stats["buffered"]) == (12, 12, 0, 0)
    assert stats["batches_written"] == len(objects)


def test_records_go_to_the_partition_of_their_own_timestamp_and_model(aws: Any):
    log = make_log(aws)
    log.log(_records(2, 0, "2024-03-09T23:59:59.900+00:00"))
    log.log(_records(3, 2, "2024-03-10T02:00:00.100+02:00"))  # 00:00 UTC, the next day
    log.log([{**r, "model_name": "other"} for r in _records(1, 5, "2024-03-10T00:30:00+00:00")])
    log.close()

    by_partition = {KEY.match(key).groups()[:3]: sorted(r["x"] for r in rs) for key, rs in _objects(aws).items()}

    assert by_partition == {
        ("m", "2024-03-09", "23"): [0, 1],
        ("m", "2024-03-10", "00"): [2, 3, 4],
        ("other", "2024-03-10", "00"): [5],
    }


def test_a_full_batch_is_written_without_waiting_for_the_interval(aws: Any):
    log = make_log(aws, batch_size=5, flush_seconds=60)
    log.start()
    try:
        log.log_chunk(_chunk(4))
        time.sleep(0.2)
        assert log.stats()["written"] == 0
        log.log_chunk(_chunk(1, 4))
        assert _wait_for(lambda: log.stats()["written"] == 5)
    finally:
        log.close()
    assert [len(records) for records in _objects(aws).values()] == [5]


def test_a_partial_batch_is_written_after_the_interval(aws: Any):
    log = make_log(aws, batch_size=500, flush_seconds=0.1)
    log.start()
    try:
        log.log_chunk(_chunk(3))
        assert _wait_for(lambda: log.stats()["written"] == 3)
    finally:
        log.close()


def test_a_failed_put_is_retried_under_the_same_key_until_s3_recovers(aws: Any):
    real_put, keys = aws.put_object, []

    def flaky_put(**kwargs: Any) -> Any:
        keys.append(kwargs["Key"])
        if len(keys) <= 3:
            raise ConnectionError("S3 is down")
        return real_put(**kwargs)

    aws.put_object = flaky_put
    log = make_log(aws, max_in_flight=1)
    log.start()
    log.log_chunk(_chunk(10))
    log.close()

    stats = log.stats()
    assert _written(aws) == list(range(10))
    assert len(set(keys)) == 1 and len(keys) == 4  # one object, its key kept across the retries
    assert (stats["write_failures"], stats["dropped"], stats["written"]) == (3, 0, 10)


def test_a_put_that_succeeded_but_timed_out_is_not_written_twice(aws: Any):
    real_put, calls = aws.put_object, {"n": 0}

    def put_then_time_out(**kwargs: Any) -> Any:
        answer = real_put(**kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("read timeout (the object was stored)")
        return answer

    aws.put_object = put_then_time_out
    log = make_log(aws, max_in_flight=1)
    log.start()
    log.log_chunk(_chunk(6))
    log.close()

    assert _written(aws) == list(range(6))  # each record once, in one object
    assert len(_objects(aws)) == 1 and log.stats()["write_failures"] == 1


def test_a_missing_bucket_keeps_the_records_until_it_exists(aws: Any):
    log = make_log(aws, bucket="created-later")
    log.start()
    try:
        log.log_chunk(_chunk(6))
        assert _wait_for(lambda: log.stats()["write_failures"] >= 2)
        assert log.stats()["buffered"] == 6
        aws.create_bucket(Bucket="created-later")
        assert log.flush(timeout=5)
    finally:
        log.close()

    assert _written(aws, bucket="created-later") == list(range(6))
    assert log.stats()["dropped"] == 0


def test_past_the_high_water_mark_it_asks_for_back_pressure_and_drops_nothing(aws: Any):
    aws.delete_bucket(Bucket=LOG_BUCKET)  # S3 "unavailable": nothing can be written
    log = make_log(aws, max_buffer=10, batch_size=4)
    log.start()
    try:
        log.log_chunk(_chunk(7))
        assert log.backlog_reason() is None
        log.log_chunk(_chunk(5, 7))
        assert "12 records not yet written to S3 (high-water mark PREDICTION_LOG_MAX_BUFFER=10)" in log.backlog_reason()
        assert _wait_for(lambda: log.stats()["write_failures"] >= 2)
        aws.create_bucket(Bucket=LOG_BUCKET)
        assert log.flush(timeout=5)
        assert log.backlog_reason() is None
    finally:
        log.close()
    assert _written(aws) == list(range(12))
    assert log.stats()["dropped"] == 0


def test_a_writer_behind_writes_larger_objects_with_several_puts_in_flight(aws: Any):
    real_put, active, peak = aws.put_object, [0], [0]
    lock = threading.Lock()

    def slow_put(**kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        return real_put(**kwargs)

    aws.put_object = slow_put
    log = make_log(aws, batch_size=10, max_in_flight=3, flush_seconds=0.05)
    log.start()
    for i in range(40):
        log.log_chunk(_chunk(10, 10 * i))
        time.sleep(0.01)
    log.close()

    sizes = sorted(len(records) for records in _objects(aws).values())
    assert _written(aws) == list(range(400))
    assert peak[0] >= 2  # several PUTs at once
    assert sizes[-1] > 10 and len(sizes) < 40  # fewer, larger objects than one per batch


def test_records_still_unwritable_at_shutdown_are_counted_as_dropped_also_in_a_put(
    aws: Any, caplog: pytest.LogCaptureFixture
):
    release = threading.Event()

    def stuck_put(**kwargs: Any) -> Any:
        release.wait(5)
        raise ConnectionError("S3 never answered")

    aws.put_object = stuck_put
    log = make_log(aws, batch_size=2, max_in_flight=1)
    log.start()
    log.log_chunk(_chunk(2))
    assert _wait_for(lambda: log.stats()["in_flight"] == 1)
    log.log_chunk(_chunk(3, 2))  # buffered behind the stuck PUT
    started = time.monotonic()
    log.close(timeout=0.3)
    release.set()

    assert time.monotonic() - started < 3
    assert log.stats()["dropped"] == 5 and log.stats()["written"] == 0
    assert "5 records could not be written to s3://network-security-lake/predictions before shutdown" in caplog.text


def test_the_spool_holds_records_across_a_crash_and_the_next_start_uploads_them(aws: Any, tmp_path: Path):
    real_put = aws.put_object

    def s3_down(**kwargs: Any) -> Any:
        raise ConnectionError("S3 is down")

    aws.put_object = s3_down
    first = make_log(aws, spool_dir=tmp_path, batch_size=3)
    first.start()
    first.log_chunk(_chunk(4))
    first.log_chunk(_chunk(2, 4, model="other"))
    # On disk before log_chunk returned (what an answered request relies on), named after its S3 key.
    spooled = sorted(p.relative_to(tmp_path).as_posix().removesuffix(".spool") for p in tmp_path.rglob("*.spool"))
    assert [KEY.match(p.removeprefix(f"segments/{LOG_BUCKET}/")).group(1) for p in spooled] == ["m", "other"]
    with pytest.raises(LogUnavailable, match="in use by another process"):
        make_log(aws, spool_dir=tmp_path).start()
    first.close(timeout=0.2)  # S3 still down: nothing lost, all left in the spool
    assert (first.stats()["dropped"], first.stats()["left_in_spool"]) == (0, 6)
    # A crash in the middle of a hand-off leaves an incomplete frame: that request was never
    # answered, so none of its records may be uploaded (not even its complete lines).
    segment = next(tmp_path.rglob("*.spool"))
    half = ENCODER.encode(_chunk(3, 100))
    segment.write_bytes(segment.read_bytes() + FRAME.pack(FRAME_MAGIC, len(half)) + half[: len(half) // 2 + 10])

    aws.put_object = real_put
    second = make_log(aws, spool_dir=tmp_path)
    second.start()
    assert second.flush(timeout=5)
    second.close()

    objects = _objects(aws)
    assert sorted(f"segments/{LOG_BUCKET}/{key}" for key in objects) == spooled  # the keys fixed at hand-off
    assert sorted(r["request_id"] for rs in objects.values() for r in rs) == [f"r{i}" for i in range(6)]
    assert second.stats()["replayed"] == 6 and not list(tmp_path.rglob("*.spool"))


def test_a_full_spool_asks_for_back_pressure(aws: Any, tmp_path: Path):
    aws.delete_bucket(Bucket=LOG_BUCKET)
    log = make_log(aws, spool_dir=tmp_path, spool_max_bytes=500)
    log.start()
    try:
        log.log_chunk(_chunk(10))
        assert "spool holds" in log.backlog_reason() and "PREDICTION_LOG_SPOOL_MAX_BYTES=500" in log.backlog_reason()
    finally:
        log.close(timeout=0.1)


def test_predictions_are_refused_with_retry_after_while_the_log_is_behind(settings, aws: Any, auth, registry):
    aws.delete_bucket(Bucket=LOG_BUCKET)
    app = create_app(settings, prediction_log=make_log(aws, max_buffer=3))
    record = record_of(registry.features, 0)
    with serving_client(app) as api:
        accepted = api.post("/predict/batch", json={"records": [record] * 3}, headers=auth)
        refused = api.post("/predict", json=record, headers=auth)
        shed = api.get("/metrics").text
        aws.create_bucket(Bucket=LOG_BUCKET)
        assert app.state.prediction_log.flush(timeout=5)
        again = api.post("/predict", json=record, headers=auth)

    assert accepted.status_code == 200
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "2")
    assert refused.json()["detail"].startswith("not accepting predictions for now: the prediction log holds 3 records")
    assert 'http_requests_shed_total{endpoint="/predict",reason="prediction_log_backlog"} 1.0' in shed
    assert again.status_code == 200
    assert app.state.prediction_log.stats()["written"] == 4


def test_logging_is_off_the_request_path(settings, aws: Any, auth, registry: Registry):
    real_put = aws.put_object

    def slow_put(**kwargs: Any) -> Any:
        time.sleep(1.0)
        return real_put(**kwargs)

    aws.put_object = slow_put
    with serving_client(create_app(settings, prediction_log=make_log(aws, batch_size=1))) as api:
        started = time.monotonic()
        for i in range(3):
            assert api.post("/predict", json=record_of(registry.features, i), headers=auth).status_code == 200
        elapsed = time.monotonic() - started
        api.app.state.prediction_log.close(timeout=0.1)  # do not wait for the slow writes

    assert elapsed < 1.0


def test_the_log_writes_again_when_the_app_starts_again(settings, aws: Any, auth, registry: Registry):
    app = create_app(settings, prediction_log=make_log(aws, flush_seconds=60))
    for run in range(2):
        with serving_client(app) as api:
            assert api.post("/predict", json=record_of(registry.features, run), headers=auth).status_code == 200

    assert sum(len(records) for records in _objects(aws).values()) == 2
    assert app.state.prediction_log.stats()["dropped"] == 0
