"""The local deploy target: a real uvicorn process of the serving app on loopback.

Embedded mode's stand-in for the EC2 host. The process outlives the task that started
it (its own session, a pid file under the state folder) and follows the registry alias
``champion``; a release asks it to reload (``POST /admin/reload``), which swaps the model
in-process without dropping a request, and the old version stays in the registry as
``previous_champion`` for rollback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.dataset_spec import PROJECT_ROOT

log = logging.getLogger(__name__)


class LocalServerError(RuntimeError):
    """The local model server could not be started, reached or reloaded."""


@dataclass(frozen=True)
class LocalServer:
    """One local model server: where it listens, its state folder and its environment.

    Attributes:
        state_dir: Folder for the pid file and the log (``<NS_STATE_DIR>/serving``).
        host: Interface (loopback).
        port: Port.
        environment: Variables of the serving process (``serving.config``), API key included.
    """

    state_dir: Path
    host: str
    port: int
    environment: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"serving-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"serving-{self.port}.log"

    @property
    def fingerprint_file(self) -> Path:
        return self.state_dir / f"serving-{self.port}.fingerprint"

    @property
    def fingerprint(self) -> str:
        """Digest of the environment: a running server started with another one is restarted."""
        text = json.dumps(self.environment, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def pid(self) -> int | None:
        """The pid from the pid file when that process is alive (a stale file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return None
        except PermissionError:
            pass
        return pid

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def ensure_started(self, timeout: float = 120.0) -> str:
        """Start the server unless ours already answers; wait until ``/health`` does.

        A server of ours started with another environment (another model name, tracking
        server or API key) is stopped and started again.

        Returns:
            ``running`` (left alone), ``started`` or ``restarted``.

        Raises:
            LocalServerError: The port is held by another program, or the process died or
                stayed silent; the message points at the log file.
        """
        outcome = "started"
        if self.pid() is not None and self.healthy():
            if self._fingerprint_on_disk() == self.fingerprint:
                return "running"
            log.info("model server at %s runs with another configuration: restarting it", self.url)
            self.stop()
            outcome = "restarted"
        if self.healthy():
            raise LocalServerError(
                f"{self.url} answers but was not started by this project (no live pid in {self.pid_file}); "
                "stop that program or choose another port (NS_SERVING_PORT)"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log_stream:
            process = subprocess.Popen(
                [sys.executable, "-m", "serving", "--host", self.host, "--port", str(self.port)],
                cwd=PROJECT_ROOT,
                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **self.environment},
                stdout=log_stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))
        self.fingerprint_file.write_text(self.fingerprint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise LocalServerError(
                    f"model server exited with code {process.returncode} at start-up; see {self.log_file}:\n"
                    + _tail(self.log_file)
                )
            if self.healthy():
                log.info("model server %s at %s (pid %s, log %s)", outcome, self.url, process.pid, self.log_file)
                return outcome
            time.sleep(0.3)
        self.stop()
        raise LocalServerError(
            f"model server did not answer {self.url}/health within {timeout:.0f} s; see {self.log_file}"
        )

    def _fingerprint_on_disk(self) -> str | None:
        try:
            return self.fingerprint_file.read_text().strip()
        except OSError:
            return None

    def reload(self, api_key: str, timeout: float = 300.0) -> dict[str, Any]:
        """Ask the server to follow its alias now; returns ``old_version``, ``new_version``, ``reloaded``."""
        import httpx

        try:
            response = httpx.post(f"{self.url}/admin/reload", headers={"X-API-Key": api_key}, timeout=timeout)
        except httpx.HTTPError as err:
            raise LocalServerError(f"cannot reach {self.url}/admin/reload: {err}") from err
        if response.status_code != 200:
            raise LocalServerError(f"{self.url}/admin/reload answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def stop(self, timeout: float = 20.0) -> str:
        """SIGTERM (the server flushes its prediction log), SIGKILL after ``timeout``."""
        pid = self.pid()
        if pid is None:
            return "not running"
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return "stopped"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
