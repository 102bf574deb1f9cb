"""The local deploy target: a real uvicorn process of the serving app on loopback.

Embedded mode's stand-in for the EC2 host. The process outlives the task that started it
(a session of its own, a pid file and a log under ``<NS_STATE_DIR>/serving``, run by the
project's one supervisor, ``tasks.supervisor``) and follows the registry alias ``champion``
of every model it serves. One server serves every dataset's model: a release of model B adds
B if needed (``PUT /admin/models/B``) and reloads B alone (``POST /admin/models/B/reload``),
which swaps it in-process without dropping a request and leaves every other model as it was;
the old version stays in the registry as ``previous_champion`` for rollback. The model that
started the server is also its default (``/predict``, ``/model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.dataset_spec import PROJECT_ROOT
from tasks.supervisor import Service, Supervisor, SupervisorError, http_ok
from tasks.tracking import CHAMPION

log = logging.getLogger(__name__)

# The serving app waits up to 20 s for S3 when it closes (PREDICTION_LOG_CLOSE_TIMEOUT_SECONDS) and 5 s for
# shadow scoring: a stop gives it more (as compose's stop_grace_period does).
STOP_TIMEOUT_SECONDS = 40.0
# Which models a server serves is the admin API's business (PUT /admin/models/{name}), not a
# restart's: these variables are left out of the fingerprint, so deploying model B never
# restarts (and never drops) model A.
MODEL_SELECTION = ("MODEL_NAME", "DATASET", "MODELS")
# boto3 keyword arguments (what the AWS connection yields) -> the environment the server's boto3 reads.
AWS_ENVIRONMENT = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "region_name": "AWS_DEFAULT_REGION",
    "endpoint_url": "AWS_ENDPOINT_URL",
}


class LocalServerError(RuntimeError):
    """The local model server could not be started, reached or reloaded."""


def model_server_service(host: str, port: int, environment: Mapping[str, str], name: str | None = None) -> Service:
    """The model server as a supervised service (``python -m serving``; healthy when ``/health`` answers)."""
    return Service(
        name=name or f"serving-{port}",
        command=[sys.executable, "-m", "serving", "--host", host, "--port", str(port)],
        port=port,
        port_variable="SERVING_PORT",
        health_path="/health",
        environment={"PYTHONPATH": str(PROJECT_ROOT), **environment},
        host=host,
        cwd=PROJECT_ROOT,
        start_timeout=120.0,
        stop_timeout=STOP_TIMEOUT_SECONDS,
        start_hint="make deploy",
    )


def serving_environment(
    *,
    tracking_uri: str,
    model_name: str,
    dataset: str,
    api_key: str,
    admin_api_key: str,
    prediction_log_bucket: str,
    aws_options: Mapping[str, Any],
    alias: str = CHAMPION,
) -> dict[str, str]:
    """The serving app's environment (``serving.config``) for one model, AWS access included."""
    return {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MODEL_NAME": model_name,
        "MODEL_ALIAS": alias,
        "DATASET": dataset,
        "API_KEY": api_key,
        # /admin/* takes its own key (the server refuses to start when it equals API_KEY).
        "ADMIN_API_KEY": admin_api_key,
        "PREDICTION_LOG_BUCKET": prediction_log_bucket,
        # Off by default: NS_SERVING_FAULT_INJECTION=true lets a release ask for a faulty candidate
        # (the `release_fault` run conf: `make run`'s deliberately bad release, the abort tests).
        "FAULT_INJECTION": "true" if os.environ.get("NS_SERVING_FAULT_INJECTION") == "true" else "false",
        **{AWS_ENVIRONMENT[k]: str(v) for k, v in aws_options.items() if v and k in AWS_ENVIRONMENT},
    }


@dataclass(frozen=True)
class LocalServer:
    """One local model server: where it listens, its state folder and its environment.

    Attributes:
        state_dir: Folder of the pid file and the log (``<NS_STATE_DIR>/serving``).
        host: Interface (loopback).
        port: Port.
        environment: Variables of the serving process (``serving.config``), API key included.
        owner_id: Marks the process as the stack's (the stack's state folder).
    """

    state_dir: Path
    host: str
    port: int
    environment: dict[str, str]
    owner_id: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def service(self) -> Service:
        return model_server_service(self.host, self.port, self.environment)

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(self.state_dir, self.state_dir, self.owner_id or str(self.state_dir.parent))

    @property
    def pid_file(self) -> Path:
        return self.supervisor.pid_file(self.service)

    @property
    def log_file(self) -> Path:
        return self.supervisor.log_file(self.service)

    @property
    def fingerprint_file(self) -> Path:
        return self.state_dir / f"{self.service.name}.fingerprint"

    @property
    def fingerprint(self) -> str:
        """Digest of the environment but the model selection: a running server started with another one is restarted."""
        kept = {key: value for key, value in self.environment.items() if key not in MODEL_SELECTION}
        text = json.dumps(kept, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def pid(self) -> int | None:
        """The pid from the pid file when that process is ours and alive (a stale file is removed)."""
        return self.supervisor.pid(self.service)

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")

    def ensure_started(self) -> str:
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
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint_file.write_text(self.fingerprint)
        try:
            started = self.supervisor.start(self.service)
        except SupervisorError as err:
            self.stop()  # a server that did not come up healthy is not left half-started
            raise LocalServerError(f"model server at {self.url}: {err}") from err
        log.info("model server %s at %s: %s (log %s)", outcome, self.url, started, self.log_file)
        return outcome

    def _fingerprint_on_disk(self) -> str | None:
        try:
            return self.fingerprint_file.read_text().strip()
        except OSError:
            return None

    def _admin(
        self, method: str, path: str, timeout: float, body: dict[str, Any] | None = None, key: str = "ADMIN_API_KEY"
    ) -> Any:
        """One call with the server's admin key (or ``key``); a busy 409 (``Retry-After``: a load is running) is waited out."""
        import time

        import httpx

        headers = {"X-API-Key": self.environment.get(key, "")}
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = httpx.request(method, f"{self.url}{path}", headers=headers, json=body, timeout=timeout)
            except httpx.HTTPError as err:
                raise LocalServerError(f"cannot reach {self.url}{path}: {err}") from err
            busy = response.status_code == 409 and "Retry-After" in response.headers
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(float(response.headers.get("Retry-After", 1)))
        if response.status_code not in (200, 201):
            raise LocalServerError(f"{method} {self.url}{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def reload(self, model_name: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
        """Ask the server to follow the alias of ``model_name`` (None: its default model) now.

        Returns:
            ``old_version``, ``new_version``, ``reloaded``. Only that model changes.
        """
        path = f"/admin/models/{model_name}/reload" if model_name else "/admin/reload"
        return self._admin("POST", path, timeout)

    def serve(self, model_name: str, dataset: str, timeout: float = 300.0) -> dict[str, Any]:
        """Serve ``model_name`` (requests of ``dataset``) at its champion, beside whatever else the server serves.

        Adds the model when the server does not serve it yet (``PUT /admin/models/{name}``), then
        reloads that model alone (a load still running is waited out); the others are not touched.

        Returns:
            The reload's ``old_version``, ``new_version``, ``reloaded`` of that model.

        Raises:
            LocalServerError: The server refused (e.g. it serves that name for another dataset).
        """
        served = {m["model_name"]: m for m in self._admin("GET", "/models", timeout, key="API_KEY")["models"]}
        if model_name not in served:
            self._admin("PUT", f"/admin/models/{model_name}", timeout, {"dataset": dataset})
        elif served[model_name]["dataset"] != dataset:
            raise LocalServerError(
                f"{self.url} serves {model_name} for dataset {served[model_name]['dataset']}, not {dataset}: "
                "a registered model serves one dataset; give the other one its own model name"
            )
        return self.reload(model_name, timeout)

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 300.0) -> Any:
        """An admin call (release control) with the server's admin key; a busy 409 is waited out."""
        return self._admin(method, path, timeout, body)

    def stop(self) -> str:
        """SIGTERM (the server flushes its prediction log), SIGKILL after ``STOP_TIMEOUT_SECONDS``."""
        return self.supervisor.stop(self.service)
