"""The local deploy target's bookkeeping (pid file, fingerprint, foreign port, environment) without the serving app."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks import supervisor
from tasks.local_server import LocalServer, LocalServerError, model_server_service, serving_environment
from tasks.supervisor import OWNER_VARIABLE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


OWNER = "/tmp/ns-test-owner"
# A stand-in for the serving app's liveness probe: 200 on /health.
HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def make_server(state_dir: Path, port: int | None = None, **environment: str) -> LocalServer:
    return LocalServer(
        state_dir=state_dir,
        host="127.0.0.1",
        port=port or free_port(),
        environment=environment or {"MODEL_NAME": "network_security", "API_KEY": "k"},
        owner_id=OWNER,
    )


def ours(*command: str) -> subprocess.Popen:
    """A process of this owner in a session of its own, as the supervisor starts the real server."""
    return subprocess.Popen(list(command), env={**os.environ, OWNER_VARIABLE: OWNER}, start_new_session=True)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def forbid_spawning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real serving app must never be started by these tests (patches ``subprocess.Popen``)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the serving app must not be started: {args}")

    monkeypatch.setattr(supervisor.subprocess, "Popen", refuse)


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_spawning(monkeypatch)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/health" else 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def foreign_http() -> Iterator[int]:
    """Another program on a loopback port answering 200 on /health; yields the port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_paths_and_url(tmp_path):
    server = make_server(tmp_path, port=8123)
    assert server.url == "http://127.0.0.1:8123"
    assert server.pid_file == tmp_path / "serving-8123.pid"
    assert server.log_file == tmp_path / "serving-8123.log"
    assert server.fingerprint_file == tmp_path / "serving-8123.fingerprint"


def test_pid_without_pid_file_is_none(tmp_path):
    assert make_server(tmp_path).pid() is None


def test_pid_removes_a_stale_pid_file(tmp_path):
    server = make_server(tmp_path)
    server.pid_file.write_text(f"{dead_pid()}\n")
    assert server.pid() is None
    assert not server.pid_file.exists()


def test_pid_of_our_live_process_is_kept_and_someone_elses_is_not(tmp_path):
    server = make_server(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    server.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not started by this owner
    assert server.pid() is None and not server.pid_file.exists()
    sleeper = ours(sys.executable, "-c", "import time; time.sleep(60)")
    try:
        server.pid_file.write_text(str(sleeper.pid))
        assert server.pid() == sleeper.pid and server.pid_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pid_file_with_garbage_is_none(tmp_path):
    server = make_server(tmp_path)
    server.pid_file.write_text("not a pid")
    assert server.pid() is None


def test_fingerprint_follows_the_environment_but_not_the_model_selection(tmp_path):
    base = make_server(tmp_path, port=8000, MODEL_NAME="a", API_KEY="k")
    assert base.fingerprint == make_server(tmp_path, port=8000, API_KEY="k", MODEL_NAME="a").fingerprint
    assert len(base.fingerprint) == 64
    # Deploying model b to the running server adds it (PUT /admin/models/b): no restart drops a.
    assert make_server(tmp_path, port=8000, MODEL_NAME="b", DATASET="b", API_KEY="k").fingerprint == base.fingerprint
    for other in (
        make_server(tmp_path, port=8000, MODEL_NAME="a", API_KEY="other"),
        make_server(tmp_path, port=8000, MODEL_NAME="a", API_KEY="k", MLFLOW_TRACKING_URI="http://x"),
    ):
        assert other.fingerprint != base.fingerprint


def test_stop_with_nothing_running(tmp_path):
    assert make_server(tmp_path).stop() == "not running"


def test_stop_with_a_stale_pid_file(tmp_path):
    server = make_server(tmp_path)
    server.pid_file.write_text(str(dead_pid()))
    assert server.stop() == "not running"
    assert not server.pid_file.exists()


def test_healthy_is_false_when_nothing_listens(tmp_path):
    assert make_server(tmp_path).healthy() is False


def test_ensure_started_refuses_a_port_held_by_another_program(tmp_path, foreign_http, no_spawn):
    server = make_server(tmp_path / "serving", port=foreign_http)
    assert server.healthy() is True
    with pytest.raises(LocalServerError) as raised:
        server.ensure_started()
    message = str(raised.value)
    assert f"127.0.0.1:{foreign_http}" in message and "is in use by pid" in message
    assert f"SERVING_PORT={foreign_http + 1}" in message
    assert not server.pid_file.exists()


def test_ensure_started_leaves_our_matching_server_running(tmp_path, monkeypatch):
    port = free_port()
    server = make_server(tmp_path, port=port)
    process = ours(sys.executable, "-c", HEALTH_SERVER, str(port))
    forbid_spawning(monkeypatch)
    try:
        _wait_until(server.healthy)
        server.pid_file.write_text(str(process.pid))
        server.fingerprint_file.write_text(server.fingerprint)
        assert server.ensure_started() == "running"
        assert server.pid_file.read_text() == str(process.pid)
    finally:
        process.kill()
        process.wait()


def test_ensure_started_stops_our_server_when_its_environment_changed(tmp_path, foreign_http, monkeypatch):
    # "Ours" is a sleeper in its own session (as the real server is); the port still answers
    # after it is stopped, so the restart then stops at the foreign-program check.
    sleeper = ours(sys.executable, "-c", "import time; time.sleep(60)")
    reaper = threading.Thread(target=sleeper.wait, daemon=True)
    reaper.start()
    forbid_spawning(monkeypatch)
    try:
        server = make_server(tmp_path, port=foreign_http)
        server.pid_file.write_text(str(sleeper.pid))
        server.fingerprint_file.write_text("fingerprint of another environment")
        with pytest.raises(LocalServerError, match="is in use by pid"):
            server.ensure_started()
        reaper.join(timeout=10)
        assert sleeper.returncode == -signal.SIGTERM
        assert not server.pid_file.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_the_server_environment_carries_the_model_and_the_aws_connection():
    environment = serving_environment(
        tracking_uri="http://mlflow:5000", model_name="m", dataset="d", api_key="k", admin_api_key="a",
        prediction_log_bucket="lake",
        aws_options={"aws_access_key_id": "id", "aws_secret_access_key": "s", "aws_session_token": None,
                     "region_name": "eu-west-1", "endpoint_url": "http://moto:5000", "profile": "ignored"},
    )  # fmt: skip
    assert environment == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODEL_NAME": "m", "MODEL_ALIAS": "champion", "DATASET": "d",
        "API_KEY": "k", "ADMIN_API_KEY": "a", "PREDICTION_LOG_BUCKET": "lake", "FAULT_INJECTION": "false", "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://moto:5000",
    }  # fmt: skip


def test_the_model_server_is_a_supervised_service():
    service = model_server_service("127.0.0.1", 8123, {"MODEL_NAME": "m"})
    assert service.name == "serving-8123" and service.url == "http://127.0.0.1:8123"
    assert service.command[1:] == ["-m", "serving", "--host", "127.0.0.1", "--port", "8123"]
    assert service.health_path == "/health" and service.environment["MODEL_NAME"] == "m"
    assert service.stop_timeout > 10  # more than the prediction log's close timeout


def _wait_until(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def admin_api(tmp_path):
    """A stand-in of the model server's model and admin routes, recording each call and the key it carried."""
    import json as json_module
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[tuple[str, str, str, dict | None]] = []
    served = {"models": [{"model_name": "network_security", "dataset": "network_security"}]}

    class Api(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict) -> None:
            data = json_module.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> dict | None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json_module.loads(self.rfile.read(length)) if length else None
            calls.append((self.command, self.path, self.headers.get("X-API-Key"), body))
            return body

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._record()
            self._answer(200, served)

        def do_PUT(self):  # noqa: N802
            body = self._record()
            served["models"].append({"model_name": self.path.rsplit("/", 1)[-1], "dataset": body["dataset"]})
            self._answer(201, {})

        def do_POST(self):  # noqa: N802
            self._record()
            self._answer(200, {"old_version": "1", "new_version": "2", "reloaded": True})

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = make_server(tmp_path, port=http.server_port, API_KEY="predict-key", ADMIN_API_KEY="admin-key")
    try:
        yield server, calls
    finally:
        http.shutdown()


def test_serving_a_new_model_adds_it_and_reloads_it_alone(admin_api):
    server, calls = admin_api

    assert server.serve("intrusion_flows", "intrusion_flows") == {
        "old_version": "1",
        "new_version": "2",
        "reloaded": True,
    }

    assert calls == [
        ("GET", "/models", "predict-key", None),
        ("PUT", "/admin/models/intrusion_flows", "admin-key", {"dataset": "intrusion_flows"}),
        ("POST", "/admin/models/intrusion_flows/reload", "admin-key", None),
    ]


def test_serving_a_served_model_only_reloads_it(admin_api):
    server, calls = admin_api

    server.serve("network_security", "network_security")

    assert [(method, path) for method, path, _, _ in calls] == [
        ("GET", "/models"), ("POST", "/admin/models/network_security/reload"),
    ]  # fmt: skip


def test_a_model_served_for_another_dataset_is_refused(admin_api):
    server, calls = admin_api

    with pytest.raises(LocalServerError, match="serves network_security for dataset network_security, not flows"):
        server.serve("network_security", "flows")
    assert [method for method, *_ in calls] == ["GET"]  # nothing changed on the server
