"""The embedded local stack: AWS emulator (moto) and MLflow tracking, on loopback.

All state lives under one git-ignored folder (``.state/`` unless ``NS_STATE_DIR``
says otherwise). Each service runs in its own process group with a pid file; the
same commands are safe to repeat:

* ``up`` twice: the second call sees the services healthy and leaves them alone;
* ``down`` twice: the second call has nothing to stop;
* after a crash: stale pid files are removed; a port held by *our own* old process
  (recognised by the stack id in its environment) is adopted; a port held by anything
  else stops ``up`` with a message naming the process and the variable that moves the port.

Usage: ``python -m scripts.stack up|down|status|env``
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STACK_ID_VAR = "NS_STACK_ID"
HOST = "127.0.0.1"


class StackError(RuntimeError):
    """The stack cannot be brought to the requested state; the message says why and what to do."""


@dataclass(frozen=True)
class Paths:
    state_dir: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        environ = os.environ if environ is None else environ
        return cls(Path(environ.get("NS_STATE_DIR", PROJECT_ROOT / ".state")).resolve())

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


@dataclass(frozen=True)
class Ports:
    moto: int
    mlflow: int
    airflow: int
    serving: int = 8000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Ports:
        environ = os.environ if environ is None else environ
        return cls(
            moto=int(environ.get("MOTO_PORT", 4566)),
            mlflow=int(environ.get("MLFLOW_PORT", 5050)),
            airflow=int(environ.get("AIRFLOW_PORT", 8080)),
            serving=int(environ.get("SERVING_PORT", 8000)),
        )


@dataclass(frozen=True)
class Service:
    """A process of a stack. The last three fields serve stacks other than this one (scripts/distributed.py).

    ``port`` may be None for a process that listens nowhere; ``health_check`` then (or instead of
    ``health_path``) says whether it is healthy. ``environment`` is added to this process's
    environment only, and ``start_hint`` is the command named when its port is taken.
    """

    name: str
    port: int | None
    port_variable: str
    command: list[str]
    health_path: str
    start_timeout: float = 60.0
    environment: Mapping[str, str] = field(default_factory=dict)
    health_check: Callable[[], bool] | None = None
    start_hint: str = "make stack-up"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def mlflow_command(port: int, backend_store_uri: str, artifacts_destination: str) -> list[str]:
    """``mlflow server`` on loopback. Artifacts are served by the tracking server (from the
    state folder or the S3 emulator), so clients need no filesystem or S3 access of their own."""
    return [
        sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination, "--serve-artifacts",
    ]  # fmt: skip


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


def services(paths: Paths, ports: Ports) -> list[Service]:
    bin_dir = Path(sys.executable).parent
    mlflow_db = paths.mlflow_dir / "mlflow.db"
    return [
        Service(
            name="moto",
            port=ports.moto,
            port_variable="MOTO_PORT",
            command=[str(bin_dir / "moto_server"), "-H", HOST, "-p", str(ports.moto)],
            health_path="/moto-api/data.json",
        ),
        Service(
            name="mlflow",
            port=ports.mlflow,
            port_variable="MLFLOW_PORT",
            command=mlflow_command(ports.mlflow, f"sqlite:///{mlflow_db}", (paths.mlflow_dir / "artifacts").as_uri()),
            health_path="/health",
            start_timeout=120.0,
        ),
    ]


def _local_secret(paths: Paths, name: str, make: Callable[[], str]) -> str:
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
    """Environment for every process that talks to the embedded stack (Airflow, scripts, tests)."""
    from cryptography.fernet import Fernet

    return {
        # Shared by the CLI, dag.test(), tests and the UI: Variables and Connections are
        # encrypted with it, so all of them must use the same key.
        "AIRFLOW__CORE__FERNET_KEY": _local_secret(
            paths, "fernet_key", lambda: _airflow_cfg_fernet_key(paths) or Fernet.generate_key().decode()
        ),
        "AIRFLOW__API_AUTH__JWT_SECRET": _local_secret(paths, "jwt_secret", lambda: secrets.token_urlsafe(32)),
        "NS_STATE_DIR": str(paths.state_dir),
        "NS_MONITORING_DB": str(paths.monitoring_db),
        "MOTO_PORT": str(ports.moto),
        "MLFLOW_PORT": str(ports.mlflow),
        "AIRFLOW_PORT": str(ports.airflow),
        # The local deploy target: the model server the training DAG deploys to (see the
        # serving_local connection) and the API key it is started with.
        "SERVING_PORT": str(ports.serving),
        "NS_SERVING_API_KEY": _local_secret(paths, "serving_api_key", lambda: secrets.token_urlsafe(24)),
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


def _healthy(service: Service, timeout: float = 2.0) -> bool:
    if service.health_check is not None:
        return service.health_check()
    try:
        with urllib.request.urlopen(service.url + service.health_path, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _listener(port: int) -> psutil.Process | None:
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            try:
                return psutil.Process(conn.pid)
            except psutil.NoSuchProcess:
                return None
    return None


def _is_ours(process: psutil.Process, paths: Paths) -> bool:
    """A process is ours if it (or its parent, for forking servers) carries our stack id."""
    for candidate in (process, process.parent()):
        if candidate is None:
            continue
        try:
            if candidate.environ().get(STACK_ID_VAR) == str(paths.state_dir):
                return True
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pid_file(paths: Paths, service: Service) -> Path:
    return paths.pids / f"{service.name}.pid"


def _read_pid(paths: Paths, service: Service) -> int | None:
    pid_file = _pid_file(paths, service)
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        pid_file.unlink()
        return None
    if not _alive(pid):
        print(f"  {service.name}: removing stale pid file (pid {pid} is gone)")
        pid_file.unlink()
        return None
    return pid


def _at(service: Service) -> str:
    return f" at {service.url}" if service.port is not None else ""


def start_service(
    service: Service, paths: Paths, env: dict[str, str], base_environ: Mapping[str, str] | None = None
) -> str:
    """Start one service unless it already runs; return what happened.

    The process gets ``base_environ`` (default: this process's environment), then ``env``, then
    the service's own ``environment``.
    """
    pid = _read_pid(paths, service)
    if pid is not None and _healthy(service):
        return f"already running (pid {pid}){_at(service)}"
    holder = _listener(service.port) if service.port is not None else None
    if holder is not None:
        root = holder.parent() if holder.parent() and _is_ours(holder.parent(), paths) else holder
        if _is_ours(holder, paths):
            _pid_file(paths, service).write_text(str(root.pid))
            _wait_healthy(service, paths)
            return f"adopted our earlier process (pid {root.pid}){_at(service)}"
        raise StackError(
            f"{service.name}: port {service.port} is in use by pid {holder.pid} ({' '.join(holder.cmdline()[:4])}); "
            f"stop it or choose another port, e.g. `{service.port_variable}={service.port + 1} {service.start_hint}`"
        )
    if pid is not None:  # our process exists but is unhealthy and not listening: restart it
        stop_service(service, paths)
    log_file = (paths.logs / f"{service.name}.log").open("ab")
    process = subprocess.Popen(
        service.command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={
            **(os.environ if base_environ is None else base_environ),
            **env,
            **service.environment,
            STACK_ID_VAR: str(paths.state_dir),
        },
        cwd=paths.state_dir,
        start_new_session=True,
    )
    _pid_file(paths, service).write_text(str(process.pid))
    _wait_healthy(service, paths, process)
    return f"started (pid {process.pid}){_at(service)}"


def _wait_healthy(service: Service, paths: Paths, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + service.start_timeout
    while time.monotonic() < deadline:
        if _healthy(service):
            return
        if process is not None and process.poll() is not None:
            _pid_file(paths, service).unlink(missing_ok=True)
            tail = (paths.logs / f"{service.name}.log").read_text(errors="replace")[-2000:]
            raise StackError(f"{service.name} exited with code {process.returncode}; last log lines:\n{tail}")
        time.sleep(0.3)
    probe = f"answer {service.url}{service.health_path}" if service.health_check is None else "become healthy"
    raise StackError(
        f"{service.name} did not {probe} within {service.start_timeout:.0f}s; "
        f"see {paths.logs / (service.name + '.log')}"
    )


def stop_service(service: Service, paths: Paths, timeout: float = 15.0) -> str:
    pid = _read_pid(paths, service)
    if pid is None:
        return "not running"
    try:
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        _pid_file(paths, service).unlink(missing_ok=True)
        return "not running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pgid, signal.SIGKILL)
    _pid_file(paths, service).unlink(missing_ok=True)
    return f"stopped (pid {pid})"


def write_env_file(paths: Paths, env: dict[str, str]) -> None:
    lines = [f"export {key}={value!r}" for key, value in sorted(env.items())]
    lines.append(f'export PATH={str(Path(sys.executable).parent)!r}:"$PATH"')
    paths.env_file.write_text(
        "# source this file to use the embedded stack's Airflow and AWS emulator\n" + "\n".join(lines) + "\n"
    )


def up(paths: Paths | None = None, ports: Ports | None = None, only: list[str] | None = None) -> dict[str, str]:
    """Start the stack's services (all, or those named in ``only``); return the stack environment."""
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    for folder in (paths.pids, paths.logs, paths.airflow_home, paths.mlflow_dir / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    env = stack_environment(paths, ports)
    for service in services(paths, ports):
        if only is None or service.name in only:
            print(f"  {service.name}: {start_service(service, paths, env)}", flush=True)
    write_env_file(paths, env)
    if only is None:
        from scripts import bootstrap

        full_env = {**os.environ, **env}
        bootstrap.migrate_airflow(full_env)
        bootstrap.create_buckets(full_env)
    return env


def down(paths: Paths | None = None, ports: Ports | None = None, only: list[str] | None = None) -> None:
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    if only is None:
        stop_airflow_ui(paths)
        stop_model_servers(paths)
    for service in reversed(services(paths, ports)):
        if only is None or service.name in only:
            print(f"  {service.name}: {stop_service(service, paths)}", flush=True)


def stop_airflow_ui(paths: Paths) -> None:
    """Stop the Airflow UI (``scripts/airflow_ui.py``) when it runs on this stack: it needs the rest."""
    from scripts import airflow_ui

    if (paths.pids / f"{airflow_ui.NAME}.pid").exists():
        print(f"  {airflow_ui.NAME}: {airflow_ui.stop(paths)}", flush=True)


def stop_model_servers(paths: Paths) -> None:
    """Stop the model servers the deploy tasks started (first: they flush their prediction log to S3)."""
    from tasks.local_server import LocalServer

    for pid_file in sorted((paths.state_dir / "serving").glob("serving-*.pid")):
        port = int(pid_file.stem.rsplit("-", 1)[1])
        server = LocalServer(pid_file.parent, HOST, port, {})
        print(f"  model server :{port}: {server.stop()}", flush=True)


def status(paths: Paths | None = None, ports: Ports | None = None) -> bool:
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    all_up = True
    for service in services(paths, ports):
        pid = _read_pid(paths, service)
        healthy = _healthy(service)
        all_up &= healthy
        print(f"  {service.name:8s} {'up' if healthy else 'down':5s} pid={pid or '-'} {service.url}")
    return all_up


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Embedded local stack (moto + MLflow).")
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument("--only", nargs="*", help="service names (moto, mlflow)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(only=args.only)
        elif args.action == "down":
            down(only=args.only)
        elif args.action == "status":
            sys.exit(0 if status() else 1)
        else:
            for key, value in sorted(stack_environment(Paths.from_env(), Ports.from_env()).items()):
                print(f"export {key}={value!r}")
    except StackError as err:
        sys.exit(f"stack: {err}")


if __name__ == "__main__":
    main()
