"""The service model: every process of the project's stacks, declared once.

| service | command | embedded (``make run``) | ``make airflow`` | distributed | docker-compose.yaml |
| --- | --- | --- | --- | --- | --- |
| ``moto`` | ``moto_server`` | yes | yes | yes | ``moto`` |
| ``mlflow`` | ``mlflow server`` | yes (SQLite) | yes | yes (Postgres, S3 artifacts) | ``mlflow`` |
| ``airflow-standalone`` | ``airflow standalone`` | | yes | | |
| ``api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` | ``airflow <component>`` | | | yes | ``airflow-<component>`` |
| ``worker-N`` | ``airflow celery worker`` | | | yes (2) | ``airflow-worker`` (scaled) |
| model server | ``python -m serving`` (``tasks.local_server``) | deploy target ``local`` | same | yes | ``serving`` |

Plus what the stacks need but do not run here: PostgreSQL and Redis (``BACKENDS``), and two
one-shots: the preparation (``scripts/bootstrap.py``; compose's ``airflow-init``) and compose's
``secrets-check`` (``scripts/check_secrets.py``; the local stacks generate their secrets). ``AIRFLOW_SETTINGS``
is the Airflow configuration the distributed deployments share. ``tests/infra`` holds
docker-compose.yaml against this module (the same services, commands and settings), so the
descriptions cannot drift apart. Every service runs under ``tasks.supervisor``.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import state_dir
from tasks.dataset_spec import PROJECT_ROOT
from tasks.local_server import model_server_service
from tasks.supervisor import LOOPBACK, Service, Supervisor

HOST = LOOPBACK
BIN = Path(sys.executable).parent

# Airflow configuration shared by every distributed deployment (scripts/distributed, compose).
AIRFLOW_SETTINGS: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    # Sensors and operators that can defer do (the S3 sensor): the triggerer runs them.
    "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
    # A task whose worker died is failed (and retried) after this long without a heartbeat.
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
    # Unacknowledged messages of a dead worker are not redelivered before this: a lost task
    # comes back through the heartbeat timeout above, as a retry, instead.
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
    # Airflow's Celery config, and each worker imports the pipeline's libraries once before it
    # forks task processes (scripts/distributed/celery_config.py, tasks/preload.py).
    "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "scripts.distributed.celery_config.CELERY_CONFIG",
}
# ``airflow <args>`` of each distributed Airflow component (compose runs the same commands).
AIRFLOW_COMPONENTS: dict[str, tuple[str, ...]] = {
    "api-server": ("api-server",),
    "scheduler": ("scheduler",),
    "dag-processor": ("dag-processor",),
    "triggerer": ("triggerer",),
    "worker": ("celery", "worker"),
}
BACKENDS = ("postgres", "redis")  # run by the machine (distributed mode) or by compose
# The model's services -> their docker-compose.yaml service (the one-shot bootstrap is airflow-init).
COMPOSE_SERVICES: dict[str, str] = {
    "moto": "moto",
    "mlflow": "mlflow",
    "api-server": "airflow-apiserver",
    "scheduler": "airflow-scheduler",
    "dag-processor": "airflow-dag-processor",
    "triggerer": "airflow-triggerer",
    "worker": "airflow-worker",
    "model-server": "serving",
    "bootstrap": "airflow-init",
    # compose only: refuses placeholder secrets before anything starts (the local stacks generate theirs)
    "secrets-check": "secrets-check",
    "postgres": "postgres",
    "redis": "redis",
}
MLFLOW_FLAGS = ("--host", "--port", "--workers", "--artifacts-destination", "--serve-artifacts", "--allowed-hosts")


@dataclass(frozen=True)
class Paths:
    """Where a stack keeps its state (one folder, git-ignored)."""

    state_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Paths:
        return cls(state_dir(environ))

    @property
    def pids(self) -> Path:
        return self.state_dir / "pids"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def mlflow_dir(self) -> Path:
        return self.state_dir / "mlflow"

    @property
    def monitoring_db(self) -> Path:
        return self.state_dir / "monitoring.db"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env.sh"

    @property
    def serving_dir(self) -> Path:
        return self.state_dir / "serving"

    @property
    def owner_id(self) -> str:
        """What marks this stack's processes (``NS_STACK_ID``): the state folder."""
        return str(self.state_dir)

    def supervisor(self) -> Supervisor:
        return Supervisor(self.pids, self.logs, self.owner_id, cwd=self.state_dir)


@dataclass(frozen=True)
class Ports:
    moto: int
    mlflow: int
    airflow: int
    serving: int = 8000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Ports:
        environ = os.environ if environ is None else environ
        return cls(
            moto=int(environ.get("MOTO_PORT", 4566)),
            mlflow=int(environ.get("MLFLOW_PORT", 5050)),
            airflow=int(environ.get("AIRFLOW_PORT", 8080)),
            serving=int(environ.get("SERVING_PORT", 8000)),
        )


def local_secret(paths: Paths, name: str, make: Callable[[], str]) -> str:
    """A secret generated once per state folder, so every process of the stack agrees on it."""
    path = paths.state_dir / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def _airflow_cfg_fernet_key(paths: Paths) -> str | None:
    """The key an existing airflow.cfg already encrypts with (state folders made before keys were shared)."""
    import configparser

    config = configparser.ConfigParser(interpolation=None)
    config.read(paths.airflow_home / "airflow.cfg")
    return config.get("core", "fernet_key", fallback=None) or None


def stack_environment(paths: Paths, ports: Ports) -> dict[str, str]:
    """Environment for every process that talks to a local stack (Airflow, scripts, tests)."""
    from cryptography.fernet import Fernet

    return {
        # Shared by the CLI, dag.test(), tests and the UI: Variables and Connections are
        # encrypted with it, so all of them must use the same key.
        "AIRFLOW__CORE__FERNET_KEY": local_secret(
            paths, "fernet_key", lambda: _airflow_cfg_fernet_key(paths) or Fernet.generate_key().decode()
        ),
        "AIRFLOW__API_AUTH__JWT_SECRET": local_secret(paths, "jwt_secret", lambda: secrets.token_urlsafe(32)),
        "NS_STATE_DIR": str(paths.state_dir),
        "NS_MONITORING_DB": str(paths.monitoring_db),
        "MOTO_PORT": str(ports.moto),
        "MLFLOW_PORT": str(ports.mlflow),
        "AIRFLOW_PORT": str(ports.airflow),
        # The local deploy target: the model server the training DAG deploys to (see the
        # serving_local connection) and the API key it is started with.
        "SERVING_PORT": str(ports.serving),
        "NS_SERVING_API_KEY": local_secret(paths, "serving_api_key", lambda: secrets.token_urlsafe(24)),
        # The model server's /admin/* key: another secret, so a predict client cannot reload or release.
        "NS_SERVING_ADMIN_API_KEY": local_secret(paths, "serving_admin_api_key", lambda: secrets.token_urlsafe(24)),
        "AIRFLOW_HOME": str(paths.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{paths.airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__TEMPLATE_SEARCHPATH": str(PROJECT_ROOT / "include"),
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "plugins")]),
        # boto3 clients outside Airflow (publishing drops, tests) follow the emulator too.
        "AWS_ENDPOINT_URL": f"http://{HOST}:{ports.moto}",
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports.mlflow}",
        "GX_ANALYTICS_ENABLED": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def s3_client(env: Mapping[str, str]) -> Any:
    """A boto3 S3 client on the stack whose environment is ``env`` (its emulator and credentials)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def airflow(*args: str) -> list[str]:
    """The venv's ``airflow`` CLI with ``args``."""
    return [str(BIN / "airflow"), *args]


def airflow_json(*args: str, env: Mapping[str, str] | None = None) -> Any:
    """Run ``airflow <args> --output json`` and return what it printed (logging may precede the JSON line).

    Raises:
        RuntimeError: The command failed; the message carries its error output.
    """
    import json
    import subprocess

    done = subprocess.run(
        airflow(*args, "--output", "json"), env=None if env is None else dict(env), cwd=PROJECT_ROOT,
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"`airflow {' '.join(args)}` failed:\n{done.stderr[-2000:]}")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(("[", "{")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return []


# --- services ------------------------------------------------------------------------------


def moto(ports: Ports, port_variable: str = "MOTO_PORT", start_hint: str = "make stack-up") -> Service:
    """The AWS emulator (S3, ECR, EC2, SSM) on loopback; it keeps its state in memory."""
    return Service(
        name="moto",
        command=[str(BIN / "moto_server"), "-H", HOST, "-p", str(ports.moto)],
        port=ports.moto,
        port_variable=port_variable,
        health_path="/moto-api/data.json",
        start_hint=start_hint,
    )


def mlflow_command(
    host: str, port: int, artifacts_destination: str, allowed_hosts: list[str], workers: int = 1
) -> list[str]:
    """``mlflow server`` arguments (``MLFLOW_FLAGS``); the backend store comes from ``MLFLOW_BACKEND_STORE_URI``.

    Artifacts are served by the tracking server (``--serve-artifacts``), so clients need no
    filesystem or S3 access of their own; ``--allowed-hosts`` names the Host headers it answers.
    """
    return [
        "server", f"--host={host}", f"--port={port}", f"--workers={workers}",
        f"--artifacts-destination={artifacts_destination}", "--serve-artifacts",
        "--allowed-hosts=" + ",".join(f"{name},{name}:*" for name in allowed_hosts),
    ]  # fmt: skip


def mlflow(
    ports: Ports,
    backend_store_uri: str,
    artifacts_destination: str,
    port_variable: str = "MLFLOW_PORT",
    start_hint: str = "make stack-up",
    start_timeout: float = 120.0,
) -> Service:
    """The MLflow tracking server (and registry) on loopback."""
    return Service(
        name="mlflow",
        command=[
            sys.executable,
            "-m",
            "mlflow",
            *mlflow_command(HOST, ports.mlflow, artifacts_destination, [HOST, "localhost"]),
        ],
        port=ports.mlflow,
        port_variable=port_variable,
        health_path="/health",
        environment={"MLFLOW_BACKEND_STORE_URI": backend_store_uri},
        start_timeout=start_timeout,
        start_hint=start_hint,
    )


def embedded(paths: Paths, ports: Ports) -> list[Service]:
    """The embedded stack's services (``make stack-up``), in start order."""
    return [
        moto(ports),
        mlflow(ports, f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}", (paths.mlflow_dir / "artifacts").as_uri()),
    ]


def airflow_standalone(ports: Ports, health_check: Callable[[], bool]) -> Service:
    """``airflow standalone`` (api-server, scheduler, dag-processor, triggerer) of ``make airflow``."""
    return Service(
        name="airflow-standalone",
        command=airflow("standalone"),
        port=ports.airflow,
        port_variable="AIRFLOW_PORT",
        health_check=health_check,
        start_timeout=300.0,  # four Airflow processes at once: slow on two busy cores
        stop_timeout=30.0,
        start_hint="make airflow",
    )


def airflow_component(
    name: str,
    *,
    args: tuple[str, ...] = (),
    port: int | None = None,
    port_variable: str = "",
    health_path: str = "",
    health_check: Callable[[], bool] | None = None,
    environment: Mapping[str, str] | None = None,
    service_name: str | None = None,
    start_hint: str = "",
) -> Service:
    """One Airflow component of ``AIRFLOW_COMPONENTS`` as a process (distributed mode)."""
    return Service(
        name=service_name or name,
        command=airflow(*AIRFLOW_COMPONENTS[name], *args),
        port=port,
        port_variable=port_variable,
        health_path=health_path,
        health_check=health_check,
        environment=dict(environment or {}),
        start_timeout=240.0,
        stop_timeout=20.0,
        start_hint=start_hint,
    )


def model_server(host: str, port: int, environment: Mapping[str, str], start_hint: str = "") -> Service:
    """The serving app (``tasks.local_server``'s declaration, named ``model-server``)."""
    service = model_server_service(host, port, environment, name="model-server")
    return Service(**{**service.__dict__, "start_hint": start_hint or service.start_hint})
