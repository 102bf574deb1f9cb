"""The one process supervisor, with real processes: start/stop twice, stale pids, ours vs foreign ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tasks.supervisor import OWNER_VARIABLE, Service, Supervisor, SupervisorError, alive

# An HTTP server that, like Airflow's components, also leaves a child behind in a process group
# of its own (the Task SDK does that for task processes): stopping must take it down too.
SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], process_group=0)
    http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind="127.0.0.1")
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def supervisor(tmp_path: Path) -> Supervisor:
    return Supervisor(tmp_path / "pids", tmp_path / "logs", owner_id=str(tmp_path), cwd=tmp_path)


def web(port: int | None = None, **changes) -> Service:
    port = port or free_port()
    values = {
        "name": "web", "command": [sys.executable, "-c", SERVER, str(port)], "port": port,
        "port_variable": "WEB_PORT", "health_path": "/", "start_timeout": 20.0, "stop_timeout": 5.0,
        "start_hint": "make web",
    }  # fmt: skip
    return Service(**{**values, **changes})


def descendants(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _sid(p.pid) == pid]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_start_and_stop_are_safe_to_repeat_and_stop_the_whole_session(supervisor):
    service = web()
    first = supervisor.start(service)
    assert first.startswith("started (pid ") and first.endswith(f"at http://127.0.0.1:{service.port}")
    pid = supervisor.pid(service)
    assert supervisor.healthy(service) and supervisor.start(service) == f"already running (pid {pid}) at {service.url}"
    deadline = time.monotonic() + 10
    while len(descendants(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    family = descendants(pid)
    assert len(family) >= 2, "the server and its child in a group of its own"
    assert any(os.getpgid(p.pid) != pid for p in family)
    assert psutil.Process(pid).environ()[OWNER_VARIABLE] == supervisor.owner_id

    assert supervisor.stop(service).startswith(f"stopped (pid {pid}")
    assert not any(alive(p.pid) for p in family)
    assert supervisor.stop(service) == "not running"
    assert not supervisor.pid_file(service).exists()


def test_a_stale_pid_file_is_removed(supervisor):
    service = web()
    supervisor.pid_dir.mkdir(parents=True)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    supervisor.pid_file(service).write_text(str(done.pid))
    assert supervisor.pid(service) is None and not supervisor.pid_file(service).exists()
    supervisor.pid_file(service).write_text("garbage")
    assert supervisor.pid(service) is None


def test_a_pid_file_naming_someone_elses_live_process_is_stale(supervisor):
    service = web()
    supervisor.pid_dir.mkdir(parents=True)
    supervisor.pid_file(service).write_text(str(os.getpid()))  # alive, but not started by this owner
    assert supervisor.pid(service) is None
    assert supervisor.stop(service) == "not running"  # and the test process is still here


def test_a_port_held_by_another_program_is_refused_naming_it(supervisor):
    service = web()
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(service.port), "--bind", "127.0.0.1"])
    try:
        deadline = time.monotonic() + 10
        while not _listening(service.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(SupervisorError) as raised:
            supervisor.start(service)
        message = str(raised.value)
        assert f"port {service.port} is in use by pid {foreign.pid}" in message
        assert f"WEB_PORT={service.port + 1} make web" in message
    finally:
        foreign.kill()
        foreign.wait()


def test_our_own_earlier_process_is_adopted(supervisor):
    service = web()
    ours = subprocess.Popen(
        list(service.command), env={**os.environ, OWNER_VARIABLE: supervisor.owner_id}, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while not _listening(service.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervisor.start(service) == f"adopted our earlier process (pid {ours.pid}) at {service.url}"
        assert supervisor.pid(service) == ours.pid
        supervisor.stop(service)
        assert ours.wait(timeout=10) is not None
    finally:
        if ours.poll() is None:
            ours.kill()


def test_a_service_that_exits_fails_with_its_log(supervisor):
    broken = web(command=[sys.executable, "-c", "import sys; print('no config here'); sys.exit(3)"])
    with pytest.raises(SupervisorError, match=r"web exited with code 3; last log lines:\nno config here"):
        supervisor.start(broken)
    assert not supervisor.pid_file(broken).exists()


def test_a_service_that_never_gets_healthy_times_out_naming_its_log(supervisor):
    silent = web(command=[sys.executable, "-c", "import time; time.sleep(60)"], start_timeout=1.0)
    with pytest.raises(SupervisorError, match=r"did not answer http://127\.0\.0\.1:\d+/ within 1s; see .*web\.log"):
        supervisor.start(silent)
    supervisor.stop(silent)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_service_that_rewrites_its_environment_with_its_title_is_still_stopped(supervisor):
    """Airflow's processes call setproctitle, which can overwrite /proc/<pid>/environ (the owner id
    with it): the pid file's start time still says the process is ours, so stop finds it."""
    pytest.importorskip("setproctitle")
    port = free_port()
    title = "import setproctitle; setproctitle.setproctitle('airflow api_server -- ' + 'x' * 4000)\n"
    service = web(port, command=[sys.executable, "-c", title + SERVER, str(port)])
    supervisor.start(service)
    pid = supervisor.pid(service)
    assert pid is not None
    assert supervisor.stop(service).startswith(f"stopped (pid {pid}")
    assert not alive(pid)


def test_a_pid_file_with_another_start_time_is_stale(supervisor):
    service = web()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        supervisor.pid_dir.mkdir(parents=True, exist_ok=True)
        started = psutil.Process(sleeper.pid).create_time()
        supervisor.pid_file(service).write_text(f"{sleeper.pid} {started - 100:.2f}")  # the pid, reused
        assert supervisor.pid(service) is None and not supervisor.pid_file(service).exists()
        supervisor.pid_file(service).write_text(f"{sleeper.pid} {started:.2f}")
        assert supervisor.pid(service) == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
