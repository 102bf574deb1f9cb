"""One process supervisor for every local service: the stacks' servers and the local model server.

A :class:`Service` says what a process is (command, environment, port, health check); a
:class:`Supervisor` runs services of one owner (a state folder) and makes every command safe
to repeat:

* each service runs in a session of its own (``start_new_session``) with a pid file and a log;
  stopping it signals the whole session, so the children it forked (gunicorn workers, the
  Airflow task processes that take process groups of their own) go with it;
* ``start`` twice: the second call sees the service healthy and leaves it alone;
* ``stop`` twice: the second call has nothing to stop;
* a stale pid file (dead process, or a pid reused by a program that is not ours) is removed: the
  file records the process's start time next to its pid, so a reused pid never matches (and a
  process that rewrote its environment with its title, as Airflow's do, is still recognised);
* a port held by *our own* earlier process (it carries the owner id in its environment) is
  adopted; a port held by anything else fails with a message naming the process and the
  variable that moves the port.

Plain Python (psutil), no project imports: ``scripts/`` and ``tasks/`` both use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

OWNER_VARIABLE = "NS_STACK_ID"
LOOPBACK = "127.0.0.1"


class SupervisorError(RuntimeError):
    """A service cannot be brought to the requested state; the message says why and what to do."""


@dataclass(frozen=True)
class Service:
    """One long-running process.

    Attributes:
        name: Names its pid file and log (``<name>.pid``, ``<name>.log``).
        command: The argv.
        port: Where it listens (None: nowhere; ``health_check`` then says whether it is up).
        port_variable: The environment variable that moves ``port`` (named when the port is taken).
        health_path: HTTP path answering 200 on ``http://host:port`` when healthy.
        health_check: Instead of ``health_path``: a callable that says whether it is healthy.
        environment: Added to this process's environment only.
        host: Interface it listens on.
        cwd: Working directory (default: the supervisor's state folder).
        start_timeout: Seconds to wait for health after starting.
        stop_timeout: Seconds between SIGTERM and SIGKILL.
        start_hint: The command to name in messages (``make stack-up``).
    """

    name: str
    command: Sequence[str]
    port: int | None = None
    port_variable: str = ""
    health_path: str = ""
    health_check: Callable[[], bool] | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    host: str = LOOPBACK
    cwd: Path | None = None
    start_timeout: float = 60.0
    stop_timeout: float = 15.0
    start_hint: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def where(self) -> str:
        return f" at {self.url}" if self.port is not None else ""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def listener(port: int) -> psutil.Process | None:
    """The process listening on ``port`` (any interface), if any."""
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                return psutil.Process(conn.pid)
    return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def session_members(pid: int) -> list[psutil.Process]:
    """Live processes in the session led by ``pid`` (and in ``pid``'s own session, if it still runs)."""
    sessions = {pid}
    with contextlib.suppress(OSError):
        sessions.add(os.getsid(pid))
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.NoSuchProcess):
            continue
    return members


class Supervisor:
    """Runs the services of one owner: pid files and logs in its folders, its id in every process.

    Args:
        pid_dir: Where the pid files go.
        log_dir: Where the logs go.
        owner_id: Marks the processes as ours (``NS_STACK_ID`` in their environment): the stack's
            state folder, so every tool working on that folder recognises them.
        cwd: Default working directory of the services.
    """

    def __init__(self, pid_dir: Path, log_dir: Path, owner_id: str, cwd: Path | None = None) -> None:
        self.pid_dir = pid_dir
        self.log_dir = log_dir
        self.owner_id = owner_id
        self.cwd = cwd

    def pid_file(self, service: Service) -> Path:
        return self.pid_dir / f"{service.name}.pid"

    def log_file(self, service: Service) -> Path:
        return self.log_dir / f"{service.name}.log"

    def is_ours(self, process: psutil.Process) -> bool:
        """The process, its parent or (a process may overwrite its environment with its title) any
        other member of its session carries our owner id."""
        candidates = [process]
        with contextlib.suppress(psutil.NoSuchProcess):
            candidates.append(process.parent())
        with contextlib.suppress(OSError, psutil.NoSuchProcess):
            candidates.extend(session_members(os.getsid(process.pid)))
        for candidate in candidates:
            if candidate is None:
                continue
            with contextlib.suppress(psutil.AccessDenied, psutil.NoSuchProcess):
                if candidate.environ().get(OWNER_VARIABLE) == self.owner_id:
                    return True
        return False

    def write_pid(self, service: Service, pid: int) -> None:
        """``<pid> <start time>``: the start time tells this process from a later one given the same pid."""
        self.pid_file(service).write_text(f"{pid} {psutil.Process(pid).create_time():.2f}\n")

    def pid(self, service: Service) -> int | None:
        """The service's pid when its pid file names a live process of ours; a stale file is removed.

        Ours: the process started at the time the file records, or (a file with a pid only, written
        by hand or by an older version) it carries our owner id (see :meth:`is_ours`).
        """
        path = self.pid_file(service)
        try:
            fields = path.read_text().split()
            pid = int(fields[0])
            started = float(fields[1]) if len(fields) > 1 else None
        except (OSError, ValueError, IndexError):
            path.unlink(missing_ok=True)
            return None
        try:
            process = psutil.Process(pid)
            ours = alive(pid) and (
                abs(process.create_time() - started) < 0.05 if started is not None else self.is_ours(process)
            )
        except psutil.NoSuchProcess:
            ours = False
        if not ours:
            path.unlink(missing_ok=True)
            return None
        return pid

    def healthy(self, service: Service) -> bool:
        if service.health_check is not None:
            return service.health_check()
        if service.port is None:
            return self.pid(service) is not None
        return http_ok(service.url + service.health_path)

    def start(
        self, service: Service, env: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
    ) -> str:
        """Start ``service`` unless it already runs healthy; wait until it is healthy; say what happened.

        The process gets ``base`` (default: this process's environment), then ``env``, then the
        service's own ``environment`` and the owner id.

        Raises:
            SupervisorError: Its port is held by another program, or it exited or stayed unhealthy.
        """
        for folder in (self.pid_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        pid = self.pid(service)
        if pid is not None and self.healthy(service):
            return f"already running (pid {pid}){service.where()}"
        holder = listener(service.port) if service.port is not None else None
        if holder is not None:
            if not self.is_ours(holder):
                hint = f"`{service.port_variable}={service.port + 1} {service.start_hint}`".strip()
                raise SupervisorError(
                    f"{service.name}: port {service.port} is in use by pid {holder.pid} "
                    f"({' '.join(holder.cmdline()[:4])}); stop it or choose another port, e.g. {hint}"
                )
            root = os.getsid(holder.pid) if alive(os.getsid(holder.pid)) else holder.pid
            self.write_pid(service, root)
            self._wait_healthy(service)
            return f"adopted our earlier process (pid {root}){service.where()}"
        if pid is not None:  # ours, alive, not healthy and not listening: start it again
            self.stop(service)
        with self.log_file(service).open("ab") as log:
            process = subprocess.Popen(
                list(service.command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    **(os.environ if base is None else base),
                    **(env or {}),
                    **service.environment,
                    OWNER_VARIABLE: self.owner_id,
                },
                cwd=service.cwd or self.cwd,
                start_new_session=True,
            )
        self.write_pid(service, process.pid)
        self._wait_healthy(service, process)
        return f"started (pid {process.pid}){service.where()}"

    def _wait_healthy(self, service: Service, process: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + service.start_timeout
        while time.monotonic() < deadline:
            if self.healthy(service):
                return
            if process is not None and process.poll() is not None:
                self.pid_file(service).unlink(missing_ok=True)
                raise SupervisorError(
                    f"{service.name} exited with code {process.returncode}; last log lines:\n{self.tail(service)}"
                )
            time.sleep(0.3)
        probe = f"answer {service.url}{service.health_path}" if service.health_check is None else "become healthy"
        raise SupervisorError(
            f"{service.name} did not {probe} within {service.start_timeout:.0f}s; see {self.log_file(service)}"
        )

    def stop(self, service: Service, timeout: float | None = None) -> str:
        """Stop the service and everything in its session; idempotent.

        SIGTERM to the service's process group first (it shuts down its own children: Airflow's
        components end their tasks, the model server flushes its log), up to ``timeout``; then
        SIGTERM, and after 5 s SIGKILL, to whatever of its session is left.
        """
        pid = self.pid(service)
        if pid is None:
            return "not running"
        timeout = service.stop_timeout if timeout is None else timeout
        seen = {p.pid for p in session_members(pid)}
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = session_members(pid)
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, stubborn = psutil.wait_procs(leftovers, timeout=5)
        for process in stubborn:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(stubborn, timeout=5)
        self.pid_file(service).unlink(missing_ok=True)
        seen.update(p.pid for p in leftovers)
        after = f", {len(leftovers)} outlived it" if leftovers else ""
        killed = f", {len(stubborn)} killed" if stubborn else ""
        return f"stopped (pid {pid}, {len(seen)} process(es){after}{killed})"

    def kill(self, service: Service) -> int:
        """SIGKILL the whole session at once, as if its machine died; return the pid.

        Raises:
            SupervisorError: The service is not running.
        """
        pid = self.pid(service)
        if pid is None:
            raise SupervisorError(f"{service.name} is not running")
        members = session_members(pid)
        for process in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(members, timeout=10)
        self.pid_file(service).unlink(missing_ok=True)
        return pid

    def tail(self, service: Service, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file(service).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
