"""Test session setup: a private embedded stack, never the developer's own.

Airflow reads its configuration when first imported, so the environment of a
private stack (its own state folder under /tmp and free ports) is set here, at
conftest import, before any test module imports Airflow. The stack itself (moto,
MLflow, migrated Airflow DB, buckets) starts only when an integration test asks for it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from scripts import bootstrap, services, stack

_AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STATE_DIR = Path(tempfile.mkdtemp(prefix="ns-test-stack-"))
PATHS = services.Paths(STATE_DIR)
PORTS = services.Ports(moto=_free_port(), mlflow=_free_port(), airflow=_free_port(), serving=_free_port())
STACK_ENV = services.stack_environment(PATHS, PORTS)
# AWS_* stay out of this process's environment: unit tests use moto's in-process mock,
# which an AWS_ENDPOINT_URL would bypass. Integration tests build explicit clients.
os.environ.update({k: v for k, v in STACK_ENV.items() if k not in _AWS_KEYS})
os.environ["NS_RETRY_DELAY_SECONDS"] = "1"


@pytest.fixture(scope="session")
def local_stack():
    """The private stack, started once per session and stopped (state deleted) at the end."""
    try:
        bootstrap.up(PATHS, PORTS)
        yield STACK_ENV
    finally:
        stack.down(PATHS, PORTS)
        shutil.rmtree(STATE_DIR, ignore_errors=True)


@pytest.fixture
def aws_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment for moto's in-process mock: no emulator endpoint, profile or real credentials leak in.

    moto only intercepts requests addressed to AWS, so an ``AWS_ENDPOINT_URL`` from the stack or
    the developer's shell would send them past the mock. The one copy of this setup: the unit
    fixtures of tests/tasks (and any other suite mocking AWS) build on it.
    """
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3(local_stack):
    """A boto3 S3 client on the private emulator."""
    return services.s3_client(local_stack)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.USAGE_ERROR  # a run that tests nothing must not pass
    shutil.rmtree(STATE_DIR, ignore_errors=True)


@pytest.fixture
def webhook(monkeypatch):
    """A local HTTP receiver, configured as the alerts webhook connection; yields the bodies it got."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, **json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = {"conn_type": "http", "host": f"http://127.0.0.1:{server.server_port}", "extra": {"endpoint": "hook"}}
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps(connection))
    try:
        yield received
    finally:
        server.shutdown()


# Suites with their own make targets: they start whole Airflows (standalone, Celery), so they
# run only when an -m expression names them. A command-line -m (`make test-unit`'s, say)
# replaces pyproject's addopts -m, so the rule lives here, not there alone.
OPT_IN_MARKERS = ("browser", "distributed")


# The slow files first: with `make test`'s workers (pytest-xdist, whole files per worker, in
# this order) the DAG runs start at once and the quick unit files fill the gaps behind them.
SLOW_FIRST = ("tests/integration/", "tests/infra/", "tests/serving/")


def _slow_first(item) -> int:
    path = item.nodeid
    return next((rank for rank, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_slow_first)  # stable: each file keeps its own order
    expression = config.getoption("markexpr") or ""
    left_out = [m for m in OPT_IN_MARKERS if m not in expression]
    deselected = [item for item in items if any(item.get_closest_marker(m) for m in left_out)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
