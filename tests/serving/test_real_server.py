"""The server as deployed: a real uvicorn process, a real S3 emulator process, real faults.

* a 200 MB upload without a key is refused at once, and ``/health`` stays fast meanwhile;
* the S3 emulator paused (SIGSTOP) under load: answers past the high-water mark are 503
  with ``Retry-After``, and every record answered 200 is in S3 exactly once after SIGCONT;
* with the spool on, the server SIGKILLed with records not yet uploaded and started
  again: every record answered 200 before the kill is in S3 exactly once.

The full-size versions (60 s, 10,000-record batches, 30 s pause) are ``bench/load_test.py``
(``--pause-s3``, ``--kill-server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from bench.common import PROJECT_ROOT, ServerProcess, free_port, percentile
from tests.serving.conftest import ADMIN_KEY, API_KEY, LOG_BUCKET, Registry, record_of

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A moto server subprocess with the log bucket: its endpoint, process and a client."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", HOST, "-p", str(port)]
    with log_path.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/data.json", timeout=1, trust_env=False)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
                time.sleep(0.1)
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
        )
        client.create_bucket(Bucket=LOG_BUCKET)
        yield {"endpoint": endpoint, "process": process, "client": client}
    finally:
        os.killpg(process.pid, signal.SIGCONT)  # never leave it stopped
        process.terminate()
        process.wait(10)


def _server(registry: Registry, moto: dict[str, Any], folder: Path, prefix: str, **settings: str) -> ServerProcess:
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MODEL_NAME": registry.model_name,
        "MODEL_VERSION": "1",
        "API_KEY": API_KEY,
        "ADMIN_API_KEY": ADMIN_KEY,
        "AWS_ENDPOINT_URL": moto["endpoint"],
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREDICTION_LOG_BUCKET": LOG_BUCKET,
        "PREDICTION_LOG_PREFIX": prefix,
        "PREDICTION_LOG_FLUSH_SECONDS": "0.2",
        "PREDICTION_LOG_S3_TIMEOUT_SECONDS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        **settings,
    }
    command = [sys.executable, "-m", "serving", "--host", HOST, "--port", str(port), "--log-level", "warning"]
    return ServerProcess("serving", command, env, f"http://{HOST}:{port}/ready", folder / f"serving-{port}.log", 60)


def _base(server: ServerProcess) -> str:
    return server.ready_url.removesuffix("/ready")


def _logged_ids(moto: dict[str, Any], prefix: str) -> Counter[str]:
    client, ids = moto["client"], Counter()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=LOG_BUCKET, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=LOG_BUCKET, Key=item["Key"])["Body"].read()
            ids.update(json.loads(line)["request_id"] for line in body.splitlines())
    return ids


def _wait_until_logged(base: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        lines = httpx.get(f"{base}/metrics", trust_env=False).text.splitlines()
        buffered = next(float(line.split()[1]) for line in lines if line.startswith("prediction_log_buffered_records "))
        if buffered == 0:
            return
        assert time.monotonic() < deadline, f"{buffered} records still not written"
        time.sleep(0.1)


class _Load:
    """Threads sending batches back to back; each request id and its answer recorded."""

    def __init__(self, base: str, records: list[dict[str, int]], clients: int, name: str) -> None:
        self.base, self.name = base, name
        self.body = json.dumps({"records": records}).encode()
        self.records = len(records)
        self.answers: list[tuple[str, int | None, str | None]] = []  # (request id, status, retry-after)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(i,)) for i in range(clients)]

    def _send(self, index: int) -> None:
        with httpx.Client(base_url=self.base, trust_env=False, timeout=30) as client:
            for n in range(10**9):
                if self.stop.is_set():
                    return
                request_id = f"{self.name}-{index}-{n}"
                headers = {"X-API-Key": API_KEY, "Content-Type": "application/json", "X-Request-ID": request_id}
                try:
                    answer = client.post("/predict/batch", content=self.body, headers=headers)
                except httpx.TransportError:
                    self.answers.append((request_id, None, None))
                    time.sleep(0.05)
                    continue
                self.answers.append((request_id, answer.status_code, answer.headers.get("retry-after")))
                if answer.status_code == 503:
                    time.sleep(0.1)  # shorter than Retry-After asks: the test must stay short

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def answered_ids(self) -> Counter[str]:
        return Counter(f"{rid}:{i}" for rid, status, _ in self.answers if status == 200 for i in range(self.records))


@pytest.fixture(scope="module")
def server(
    registry: Registry, moto: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    registry.move_alias("champion", "1")
    process = _server(
        registry, moto, tmp_path_factory.mktemp("serving"), "pause-test", PREDICTION_LOG_MAX_BUFFER="1500"
    )
    with process:
        yield process


def _upload(base: str, headers: str, size: int) -> tuple[float, bytes]:
    """Send a POST declaring ``size`` bytes and stream them; (seconds to the status line, status line)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /predict/batch HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n{headers}\r\n".encode()
    )
    started = time.perf_counter()

    def stream() -> None:
        chunk = b"[" * (1 << 20)
        with contextlib.suppress(OSError):
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)

    writer = threading.Thread(target=stream, daemon=True)
    writer.start()
    status = sock.recv(64).split(b"\r\n")[0]
    elapsed = time.perf_counter() - started
    writer.join(10)
    sock.close()
    return elapsed, status


def test_a_200_mb_upload_is_refused_at_once_and_health_stays_fast(server: ServerProcess):
    base = _base(server)
    timings: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                timings.append(time.perf_counter() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        unauthenticated = [_upload(base, "", 200 << 20) for _ in range(3)]
        oversized = _upload(base, f"X-API-Key: {API_KEY}\r\n", 200 << 20)
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join(10)

    assert {status for _, status in unauthenticated} == {b"HTTP/1.1 401 Unauthorized"}
    assert oversized[1] == b"HTTP/1.1 413 Request Entity Too Large"
    assert max(seconds for seconds, _ in [*unauthenticated, oversized]) < 0.1
    assert len(timings) > 20 and percentile(timings, 99) < 0.05


def test_s3_paused_under_load_loses_and_duplicates_nothing(server: ServerProcess, moto: dict[str, Any], registry):
    base = _base(server)
    records = [record_of(registry.features, i % 400) for i in range(500)]
    with _Load(base, records, clients=2, name="pause") as load:
        time.sleep(1.0)
        os.killpg(moto["process"].pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)
        finally:
            os.killpg(moto["process"].pid, signal.SIGCONT)
        time.sleep(1.0)
    _wait_until_logged(base)

    statuses = Counter(status for _, status, _ in load.answers)
    refused = [retry for _, status, retry in load.answers if status == 503]
    answered, logged = load.answered_ids(), _logged_ids(moto, "pause-test")
    assert set(statuses) == {200, 503}  # no other error, no request without an answer
    assert refused and all(retry == "2" for retry in refused)  # the high-water mark was reached
    assert logged == answered  # every record answered 200 once, nothing else


def test_with_the_spool_a_killed_server_loses_nothing_it_answered(registry, moto: dict[str, Any], tmp_path: Path):
    spool = {"PREDICTION_LOG_SPOOL_DIR": str(tmp_path / "spool"), "PREDICTION_LOG_FLUSH_SECONDS": "60"}
    # Nothing is uploaded before the kill (long interval, large objects): it all sits in the spool.
    first = _server(registry, moto, tmp_path, "kill-test", PREDICTION_LOG_BATCH_SIZE="1000000", **spool)
    records = [record_of(registry.features, i) for i in range(200)]
    with first, _Load(_base(first), records, clients=2, name="kill") as load:
        deadline = time.monotonic() + 10
        while sum(1 for _, status, _ in load.answers if status == 200) < 6:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
    assert _logged_ids(moto, "kill-test") == Counter()  # nothing had reached S3

    with _server(registry, moto, tmp_path, "kill-test", **spool) as second:
        _wait_until_logged(_base(second))
    answered, logged = load.answered_ids(), _logged_ids(moto, "kill-test")
    assert answered and all(logged[log_id] == 1 for log_id in answered)
    # Only requests cut off by the kill may be there unanswered (spooled before their answer was sent).
    cut_off = {rid for rid, status, _ in load.answers if status is None}
    extra = Counter(log_id.rpartition(":")[0] for log_id in logged - answered)
    assert set(extra) <= cut_off
    assert set(extra.values()) <= {len(records)}  # a request cut off by the kill is there whole or not at all
    assert max(logged.values()) == 1
