"""Distributed mode on loopback: the services of docker-compose.yaml as local processes.

Airflow on CeleryExecutor with PostgreSQL metadata and result backend and the Redis broker:
``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` and two ``celery worker``
processes (own celery hostnames, small concurrency); the MLflow tracking server on Postgres with
its artifacts in the AWS emulator; the monitoring store on Postgres; moto. DAGs from ``dags/``,
settings from ``airflow_settings.yaml``, as in the embedded stack (``scripts/stack.py``, whose
process management this reuses: pid files, one log per process, one process group each).

PostgreSQL and Redis are not started here: they must be running (``up`` and ``test`` stop with
one line naming the missing one). This stack owns three databases there (``ns_airflow_dist``,
``ns_mlflow_dist``, ``ns_monitoring_dist``) and one Redis database number (5); it never touches
any other. Everything else lives under ``.state-distributed/`` (``NS_DIST_STATE_DIR``).

Usage::

    python -m scripts.distributed up [--fresh]   # --fresh: drop/recreate its databases, flush its Redis db, new state dir
    python -m scripts.distributed status
    python -m scripts.distributed down [--drop]  # stops what up started (by pid); --drop also drops its databases
    python -m scripts.distributed env            # the environment, to `eval` in a shell
    python -m scripts.distributed test [--keep] [pytest args...]

Variables (defaults in brackets; ports differ from the embedded stack's 4566/5050/8080/8000):
``NS_DIST_STATE_DIR`` [.state-distributed], ``NS_DIST_MOTO_PORT`` [4766], ``NS_DIST_MLFLOW_PORT``
[5250], ``NS_DIST_AIRFLOW_PORT`` [8280], ``NS_DIST_SERVING_PORT`` [8200],
``NS_DIST_SCHEDULER_HEALTH_PORT`` [8281], ``NS_DIST_TRIGGERER_LOG_PORT`` [8282],
``NS_DIST_PG_HOST`` [127.0.0.1], ``NS_DIST_PG_PORT`` [5432], ``NS_DIST_PG_USER`` [postgres],
``NS_DIST_PG_PASSWORD`` [], ``NS_DIST_DB_SUFFIX`` [dist], ``NS_DIST_REDIS_HOST`` [127.0.0.1],
``NS_DIST_REDIS_PORT`` [6379], ``NS_DIST_REDIS_DB`` [5], ``NS_DIST_WORKERS`` [2],
``NS_DIST_WORKER_CONCURRENCY`` [2], ``NS_DIST_DEPLOY_TARGETS`` [empty: none, see environment()],
``NS_DIST_RETRY_DELAY_SECONDS`` [5], ``NS_DIST_HEARTBEAT_TIMEOUT`` [40].
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from scripts import stack

PROJECT_ROOT = stack.PROJECT_ROOT
HOST = stack.HOST
DEFAULT_STATE_DIR = PROJECT_ROOT / ".state-distributed"
ADMIN_USER = "admin"
MLFLOW_ARTIFACT_BUCKET = "network-security-mlflow"
# The worker's name for the Task SDK (``[core] hostname_callable``): what task instances record as
# ``hostname``. Both workers run on this machine, so the FQDN would not tell them apart.
HOSTNAME_VAR = "NS_DIST_HOSTNAME"
HOSTNAME_CALLABLE = "scripts.distributed.worker_hostname"
# Databases this stack may create and drop; nothing else is ever dropped.
PROTECTED_DATABASES = {"postgres", "root", "test", "template0", "template1"}
START_HINT = "python -m scripts.distributed up"


class DistError(RuntimeError):
    """The distributed stack cannot do what was asked; the message says why and what to do."""


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers: their own name, else the FQDN."""
    return os.environ.get(HOSTNAME_VAR) or socket.getfqdn()


@dataclass(frozen=True)
class Config:
    paths: stack.Paths
    ports: stack.Ports
    scheduler_health_port: int
    triggerer_log_port: int
    pg_host: str
    pg_port: int
    pg_user: str
    pg_password: str
    db_suffix: str
    redis_host: str
    redis_port: int
    redis_db: int
    workers: int
    worker_concurrency: int
    deploy_targets: str
    retry_delay: int
    heartbeat_timeout: int

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ

        def get(name: str, default: object) -> str:
            return environ.get(f"NS_DIST_{name}", str(default))

        return cls(
            paths=stack.Paths(Path(get("STATE_DIR", DEFAULT_STATE_DIR)).resolve()),
            ports=stack.Ports(
                moto=int(get("MOTO_PORT", 4766)),
                mlflow=int(get("MLFLOW_PORT", 5250)),
                airflow=int(get("AIRFLOW_PORT", 8280)),
                serving=int(get("SERVING_PORT", 8200)),
            ),
            scheduler_health_port=int(get("SCHEDULER_HEALTH_PORT", 8281)),
            triggerer_log_port=int(get("TRIGGERER_LOG_PORT", 8282)),
            pg_host=get("PG_HOST", HOST),
            pg_port=int(get("PG_PORT", 5432)),
            pg_user=get("PG_USER", "postgres"),
            pg_password=get("PG_PASSWORD", ""),
            db_suffix=get("DB_SUFFIX", "dist"),
            redis_host=get("REDIS_HOST", HOST),
            redis_port=int(get("REDIS_PORT", 6379)),
            redis_db=int(get("REDIS_DB", 5)),
            workers=int(get("WORKERS", 2)),
            worker_concurrency=int(get("WORKER_CONCURRENCY", 2)),
            deploy_targets=get("DEPLOY_TARGETS", ""),
            retry_delay=int(get("RETRY_DELAY_SECONDS", 5)),
            heartbeat_timeout=int(get("HEARTBEAT_TIMEOUT", 40)),
        )

    @property
    def databases(self) -> dict[str, str]:
        return {role: f"ns_{role}_{self.db_suffix}" for role in ("airflow", "mlflow", "monitoring")}

    def pg_url(self, database: str, scheme: str = "postgresql+psycopg2") -> str:
        credentials = quote(self.pg_user, safe="") + (
            f":{quote(self.pg_password, safe='')}" if self.pg_password else ""
        )
        return f"{scheme}://{credentials}@{self.pg_host}:{self.pg_port}/{database}"

    @property
    def broker_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.ports.airflow}"

    @property
    def worker_hostnames(self) -> dict[str, str]:
        """Service name -> the hostname its task instances record."""
        return {f"worker-{i}": f"ns-dist-worker-{i}" for i in range(1, self.workers + 1)}

    @property
    def password_file(self) -> Path:
        return self.paths.state_dir / "secrets" / "simple_auth_manager_passwords.json"

    def admin_password(self) -> str:
        return stack._local_secret(self.paths, "airflow_admin_password", lambda: _token(18))

    def where_logs(self) -> str:
        return f"process logs: {self.paths.logs}/*.log; task logs: {self.paths.airflow_home / 'logs'}"


def _token(size: int) -> str:
    import secrets

    return secrets.token_urlsafe(size)


# --------------------------------------------------------------------------- environment


def environment(config: Config) -> dict[str, str]:
    """What every process of the distributed stack sees (Airflow, MLflow, the tests' clients)."""
    env = stack.stack_environment(config.paths, config.ports)
    airflow_db = config.pg_url(config.databases["airflow"])
    monitoring = {
        "conn_type": "postgres",
        "host": config.pg_host,
        "port": config.pg_port,
        "schema": config.databases["monitoring"],
        "login": config.pg_user,
        **({"password": config.pg_password} if config.pg_password else {}),
    }
    env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
            "AIRFLOW__CELERY__BROKER_URL": config.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_db,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(config.worker_concurrency),
            # Unacknowledged messages of a dead worker are not redelivered before this: a lost
            # task comes back through the heartbeat timeout below, as a retry, instead.
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{config.api_url}/execution/",
            "AIRFLOW__API__BASE_URL": config.api_url,
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(config.ports.airflow),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": stack._local_secret(config.paths, "api_secret_key", lambda: _token(32)),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(config.password_file),
            # Sensors and operators that can defer do (the S3 sensor, the SSM rollout): the triggerer runs them.
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": HOST,
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(config.scheduler_health_port),
            # A task whose worker died is failed (and retried) after this many seconds without heartbeat.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(config.heartbeat_timeout),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(config.triggerer_log_port),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # The monitoring store on Postgres; a connection in the environment wins over the
            # metadata database's (airflow_settings.yaml's SQLite one), as in docker-compose.yaml.
            "AIRFLOW_CONN_MONITORING_STORE": json.dumps(monitoring),
            "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
            "MLFLOW_ARTIFACT_BUCKET": MLFLOW_ARTIFACT_BUCKET,
            # No deploy target by default: `local` would start a uvicorn next to whichever worker ran
            # the task (docker-compose.yaml), and `ec2`'s rollout, deferred like every operator here,
            # waits in the triggerer through SSM ListCommandInvocations, which moto does not implement.
            "NS_DEPLOY_TARGETS": config.deploy_targets,
            "NS_RETRY_DELAY_SECONDS": str(config.retry_delay),
            # Runs come from the API, the drift DAG or the tests: no scheduled run competes with them.
            "NS_SCHEDULE_NETWORK_SECURITY_TRAINING": "none",
            "NS_SCHEDULE_NETWORK_SECURITY_DRIFT": "none",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )
    return env


def base_environ() -> dict[str, str]:
    """The caller's environment without what would configure Airflow, MLflow or the project differently."""
    prefixes = ("AIRFLOW", "_AIRFLOW", "NS_", "MLFLOW_", "AWS_")
    return {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}


# --------------------------------------------------------------------------- PostgreSQL and Redis


def _pg_connect(config: Config, database: str = "postgres") -> Any:
    import psycopg2

    return psycopg2.connect(
        host=config.pg_host,
        port=config.pg_port,
        user=config.pg_user,
        password=config.pg_password or None,
        dbname=database,
        connect_timeout=5,
    )


def _redis(config: Config) -> Any:
    import redis

    return redis.Redis(
        host=config.redis_host, port=config.redis_port, db=config.redis_db, socket_connect_timeout=3, socket_timeout=5
    )


def preflight(config: Config) -> str | None:
    """One line naming what is missing (PostgreSQL or Redis) and how to start it; None when both answer."""
    try:
        _pg_connect(config).close()
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            f"PostgreSQL is not reachable at {config.pg_host}:{config.pg_port} as {config.pg_user} ({reason}); "
            "start it (e.g. `service postgresql start`) or set NS_DIST_PG_HOST/NS_DIST_PG_PORT/NS_DIST_PG_USER"
        )
    try:
        _redis(config).ping()
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            f"Redis is not reachable at {config.redis_host}:{config.redis_port} ({reason}); "
            "start it (e.g. `service redis-server start` or `redis-server --daemonize yes`) "
            "or set NS_DIST_REDIS_HOST/NS_DIST_REDIS_PORT"
        )
    return None


def _own_databases(config: Config) -> list[str]:
    names = list(config.databases.values())
    for name in names:
        if name in PROTECTED_DATABASES or not name.startswith("ns_"):
            raise DistError(f"refusing to manage database {name!r}: choose another NS_DIST_DB_SUFFIX")
    return names


def existing_databases(config: Config) -> list[str]:
    connection = _pg_connect(config)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (_own_databases(config),))
            return sorted(row[0] for row in cursor.fetchall())
    finally:
        connection.close()


def _admin(config: Config, statements: Iterable[str]) -> None:
    connection = _pg_connect(config)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


def create_databases(config: Config) -> list[str]:
    missing = [name for name in _own_databases(config) if name not in existing_databases(config)]
    _admin(config, [f'CREATE DATABASE "{name}"' for name in missing])
    return missing


def drop_databases(config: Config) -> list[str]:
    present = existing_databases(config)
    _admin(config, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in present])
    return present


def flush_redis(config: Config) -> int:
    """Empty this stack's Redis database (and only it); return how many keys it held."""
    client = _redis(config)
    keys = client.dbsize()
    client.flushdb()
    return keys


# --------------------------------------------------------------------------- services


_PING_LOCK = threading.Lock()


@functools.cache
def _celery_app(broker_url: str) -> Any:
    from celery import Celery

    return Celery("ns-dist-ping", broker=broker_url)


def celery_node(config: Config, service_name: str) -> str:
    return f"{config.worker_hostnames[service_name]}@{socket.gethostname()}"


def celery_ping(config: Config, nodes: list[str], timeout: float = 1.5) -> set[str]:
    """The celery nodes among ``nodes`` that answer a ping through the broker."""
    with _PING_LOCK:
        try:
            replies = _celery_app(config.broker_url).control.ping(destination=nodes, timeout=timeout)
        except Exception:  # broker hiccup: nobody answered
            return set()
    return {name for reply in replies for name in reply}


def api_health(config: Config, timeout: float = 3.0) -> dict[str, Any] | None:
    import httpx

    try:
        response = httpx.get(f"{config.api_url}/api/v2/monitor/health", timeout=timeout)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _job_healthy(config: Config, component: str, service_name: str) -> bool:
    """Healthy in the api-server's view, with a heartbeat from the process we started (not an earlier one)."""
    health = api_health(config)
    pid_file = config.paths.pids / f"{service_name}.pid"
    if not health or not health.get(component) or not pid_file.exists():
        return False
    info = health[component]
    heartbeat = info.get(f"latest_{component}_heartbeat")
    if info.get("status") != "healthy" or not heartbeat:
        return False
    try:
        started = psutil.Process(int(pid_file.read_text().strip())).create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    return dt.datetime.fromisoformat(heartbeat).timestamp() >= started - 1


def _airflow(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "airflow"), *args]


def services(config: Config) -> list[stack.Service]:
    """In start order; ``down`` stops them in reverse."""
    hint = START_HINT
    moto = dataclasses.replace(
        next(s for s in stack.services(config.paths, config.ports) if s.name == "moto"),
        port_variable="NS_DIST_MOTO_PORT",
        start_hint=hint,
    )
    mlflow = stack.Service(
        name="mlflow",
        port=config.ports.mlflow,
        port_variable="NS_DIST_MLFLOW_PORT",
        # As in docker-compose.yaml: artifacts in the S3 emulator.
        command=stack.mlflow_command(
            config.ports.mlflow, config.pg_url(config.databases["mlflow"]), f"s3://{MLFLOW_ARTIFACT_BUCKET}"
        ),
        health_path="/health",
        start_timeout=240.0,
        start_hint=hint,
    )
    airflow = [
        stack.Service(
            name="api-server",
            port=config.ports.airflow,
            port_variable="NS_DIST_AIRFLOW_PORT",
            command=_airflow("api-server", "--host", HOST, "--port", str(config.ports.airflow), "--workers", "1"),
            health_path="/api/v2/monitor/health",
            start_timeout=240.0,
            start_hint=hint,
        ),
        stack.Service(
            name="scheduler",
            port=config.scheduler_health_port,
            port_variable="NS_DIST_SCHEDULER_HEALTH_PORT",
            command=_airflow("scheduler"),
            health_path="/health",
            start_timeout=240.0,
            start_hint=hint,
        ),
        stack.Service(
            name="dag-processor",
            port=None,
            port_variable="",
            command=_airflow("dag-processor"),
            health_path="",
            start_timeout=240.0,
            health_check=lambda: _job_healthy(config, "dag_processor", "dag-processor"),
            start_hint=hint,
        ),
        stack.Service(
            name="triggerer",
            port=None,
            port_variable="",
            command=_airflow("triggerer"),
            health_path="",
            start_timeout=240.0,
            health_check=lambda: _job_healthy(config, "triggerer", "triggerer"),
            start_hint=hint,
        ),
    ]
    workers = [
        stack.Service(
            name=name,
            port=None,
            port_variable="",
            # Task logs go to the shared AIRFLOW_HOME/logs (the compose stack shares a volume),
            # so the workers serve none: two log servers on one host would need two ports.
            command=_airflow(
                "celery",
                "worker",
                "--celery-hostname",
                celery_node(config, name),
                "--concurrency",
                str(config.worker_concurrency),
                "--skip-serve-logs",
            ),
            health_path="",
            start_timeout=240.0,
            environment={HOSTNAME_VAR: hostname, "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE},
            health_check=functools.partial(_worker_healthy, config, name),
            start_hint=hint,
        )
        for name, hostname in config.worker_hostnames.items()
    ]
    return [moto, mlflow, *airflow, *workers]


def _worker_healthy(config: Config, name: str) -> bool:
    node = celery_node(config, name)
    return node in celery_ping(config, [node])


def service(config: Config, name: str) -> stack.Service:
    by_name = {s.name: s for s in services(config)}
    if name not in by_name:
        raise DistError(f"no service {name!r}; services: {', '.join(by_name)}")
    return by_name[name]


def running(config: Config) -> list[str]:
    """Services of this state dir whose pid file names a live process."""
    alive = []
    for svc in services(config):
        pid_file = config.paths.pids / f"{svc.name}.pid"
        try:
            if stack._alive(int(pid_file.read_text().strip())):
                alive.append(svc.name)
        except (OSError, ValueError):
            continue
    return alive


def _start_all(config: Config, chosen: list[stack.Service], env: dict[str, str]) -> None:
    """Start ``chosen`` in parallel (they wait for their own health); fail naming every one that did not come up."""
    base = base_environ()
    errors = []
    with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
        futures = {pool.submit(stack.start_service, svc, config.paths, env, base): svc for svc in chosen}
        for future in as_completed(futures):
            svc = futures[future]
            try:
                print(f"  {svc.name}: {future.result()}", flush=True)
            except stack.StackError as err:
                errors.append(str(err))
    if errors:
        raise DistError("\n".join(errors) + f"\n{config.where_logs()}")


def _bootstrap(config: Config, env: dict[str, str]) -> None:
    """Migrate Airflow's database and apply airflow_settings.yaml (scripts/bootstrap.py), with the output logged."""
    from scripts import bootstrap

    log = config.paths.logs / "bootstrap.log"
    try:
        bootstrap.migrate_airflow({**base_environ(), **env})
    except RuntimeError as err:
        log.write_text(str(err))
        raise DistError(f"bootstrap failed (see {log}): {str(err)[-1500:]}") from err


def _create_buckets(env: dict[str, str]) -> None:
    from scripts import bootstrap
    from tasks import storage

    full = {**base_environ(), **env}
    bootstrap.create_buckets(full)
    storage.ensure_bucket(stack.s3_client(env), MLFLOW_ARTIFACT_BUCKET)
    print(f"  bucket: {MLFLOW_ARTIFACT_BUCKET} (MLflow artifacts)", flush=True)


def _write_password_file(config: Config) -> None:
    """The simple auth manager's users file: the admin with this state dir's generated password."""
    config.password_file.parent.mkdir(parents=True, exist_ok=True)
    config.password_file.write_text(json.dumps({ADMIN_USER: config.admin_password()}) + "\n")
    config.password_file.chmod(0o600)


def write_env_file(config: Config, env: dict[str, str]) -> None:
    lines = [f"export {key}={value!r}" for key, value in sorted(env.items()) if key != "PATH"]
    lines.append(f'export PATH={str(Path(sys.executable).parent)!r}:"$PATH"')
    config.paths.env_file.write_text(
        "# source this file to use the distributed stack (scripts/distributed.py) from a shell\n"
        + "\n".join(lines)
        + "\n"
    )


def up(config: Config, fresh: bool = False, wait_for_dags: bool = True) -> dict[str, str]:
    """Start every service (those already healthy are left alone); return the stack's environment."""
    problem = preflight(config)
    if problem:
        raise DistError(problem)
    if fresh:
        alive = running(config)
        if alive:
            raise DistError(
                f"--fresh with services running ({', '.join(alive)}) under {config.paths.state_dir}; "
                "run `python -m scripts.distributed down` first"
            )
        dropped = drop_databases(config)
        keys = flush_redis(config)
        shutil.rmtree(config.paths.state_dir, ignore_errors=True)
        print(
            f"  fresh: dropped {', '.join(dropped) or 'no databases'}; flushed Redis db {config.redis_db} "
            f"({keys} keys); removed {config.paths.state_dir}",
            flush=True,
        )
    for folder in (config.paths.pids, config.paths.logs, config.paths.airflow_home):
        folder.mkdir(parents=True, exist_ok=True)
    created = create_databases(config)
    print(
        f"  postgres: {', '.join(config.databases.values())} ({'created ' + ', '.join(created) if created else 'present'})"
    )
    print(f"  redis: {config.broker_url}", flush=True)
    env = environment(config)
    _write_password_file(config)
    write_env_file(config, env)
    by_name = {svc.name: svc for svc in services(config)}
    _start_all(config, [by_name["moto"]], env)
    _create_buckets(env)
    # MLflow's and Airflow's schema migrations are independent: run them side by side.
    with ThreadPoolExecutor(max_workers=2) as pool:
        migrate = pool.submit(_bootstrap, config, env)
        _start_all(config, [by_name["mlflow"]], env)
        migrate.result()
    _start_all(config, [by_name["api-server"]], env)
    _start_all(config, [svc for name, svc in by_name.items() if name not in ("moto", "mlflow", "api-server")], env)
    if wait_for_dags:
        AirflowApi.for_config(config).wait_for_dags(DAG_IDS, timeout=240)
        print(f"  dags: {', '.join(DAG_IDS)} parsed and unpaused", flush=True)
    print(
        f"  Airflow UI/API {config.api_url} (user {ADMIN_USER}, password in {config.password_file}); "
        f"MLflow http://{HOST}:{config.ports.mlflow}; env: source {config.paths.env_file}\n  {config.where_logs()}",
        flush=True,
    )
    return env


def start(config: Config, names: list[str]) -> None:
    """(Re)start the named services (e.g. a worker after it was killed)."""
    chosen = [service(config, name) for name in names]
    _start_all(config, chosen, environment(config))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_groups(processes: Iterable[psutil.Process], sig: int = signal.SIGKILL) -> None:
    """Signal the process group of every process still alive (the Task SDK gives each task its own group)."""
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                os.killpg(os.getpgid(process.pid), sig)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue


def stop(config: Config, svc: stack.Service) -> str:
    """stack.stop_service, plus any task process that outlived its worker in a group of its own."""
    pid = stack._read_pid(config.paths, svc)
    children = _descendants(pid) if pid else []
    outcome = stack.stop_service(svc, config.paths, timeout=20.0)
    _kill_groups(children)
    return outcome


def kill(config: Config, name: str) -> int:
    """SIGKILL a service at once, as if its machine died: its process group and the task groups under it."""
    svc = service(config, name)
    pid = stack._read_pid(config.paths, svc)
    if pid is None:
        raise DistError(f"{name} is not running")
    children = _descendants(pid)
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    _kill_groups(children)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and stack._alive(pid):
        time.sleep(0.1)
    (config.paths.pids / f"{name}.pid").unlink(missing_ok=True)
    return pid


def down(config: Config, drop: bool = False) -> None:
    """Stop what ``up`` started (by pid file), newest first; with ``drop``, also drop its databases and Redis db."""
    for svc in reversed(services(config)):
        print(f"  {svc.name}: {stop(config, svc)}", flush=True)
    if drop:
        problem = preflight(config)
        if problem:
            raise DistError(f"cannot drop: {problem}")
        dropped = drop_databases(config)
        keys = flush_redis(config)
        print(
            f"  dropped {', '.join(dropped) or 'no databases'}; flushed Redis db {config.redis_db} ({keys} keys)",
            flush=True,
        )


def status(config: Config) -> bool:
    all_up = True
    for svc in services(config):
        pid = stack._read_pid(config.paths, svc)
        healthy = pid is not None and stack._healthy(svc)
        all_up &= healthy
        where = (
            svc.url
            if svc.port is not None
            else ("celery " + celery_node(config, svc.name) if "worker" in svc.name else "")
        )
        print(f"  {svc.name:14s} {'up' if healthy else 'down':5s} pid={pid or '-':<8} {where}")
    problem = preflight(config)
    if problem:
        print(f"  {problem}")
        return False
    print(
        f"  postgres       databases {', '.join(existing_databases(config)) or 'none'} of {', '.join(config.databases.values())}"
    )
    print(f"  redis          {config.broker_url} ({_redis(config).dbsize()} keys)")
    health = api_health(config)
    if health:
        print("  airflow health " + ", ".join(f"{k}={v.get('status')}" for k, v in health.items() if v))
    print(f"  {config.where_logs()}")
    return all_up


# --------------------------------------------------------------------------- REST API (Airflow 3 public API v2)

DAG_IDS = ("network_security_training", "network_security_drift", "network_security_deploy")
TERMINAL_RUN_STATES = {"success", "failed"}


class AirflowApi:
    """The public REST API with a JWT from the simple auth manager's ``POST /auth/token``."""

    def __init__(self, base_url: str, username: str, password: str, where_logs: str = "") -> None:
        import httpx

        self.base_url = base_url
        self._credentials = {"username": username, "password": password}
        self._client = httpx.Client(base_url=base_url, timeout=30.0)
        self.where_logs = where_logs
        self._login()

    @classmethod
    def for_config(cls, config: Config) -> AirflowApi:
        return cls(config.api_url, ADMIN_USER, config.admin_password(), config.where_logs())

    def _login(self) -> None:
        response = self._client.post("/auth/token", json=self._credentials)
        if response.status_code not in (200, 201):
            raise DistError(
                f"login as {self._credentials['username']} at {self.base_url}/auth/token failed: "
                f"{response.status_code} {response.text[:300]}"
            )
        self._client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        for attempt in range(5):
            try:
                response = self._client.request(method, "/api/v2" + path, **kwargs)
            except httpx.TransportError as err:  # the api-server is busy or restarting: try again
                if attempt == 4:
                    raise DistError(f"{method} {self.base_url}/api/v2{path}: {err}") from err
                time.sleep(2)
                continue
            if response.status_code == 401 and attempt == 0:
                self._login()
                continue
            if response.status_code >= 400:
                raise DistError(f"{method} /api/v2{path}: {response.status_code} {response.text[:500]}")
            return response.json() if response.content else None
        raise DistError(f"{method} /api/v2{path}: no answer")

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", f"/dags/{dag_id}")
        except DistError as err:
            if ": 404 " in str(err):
                return None
            raise

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float) -> None:
        """Until the dag-processor has parsed them; unpause any that is paused."""
        pending = list(dag_ids)
        deadline = time.monotonic() + timeout
        while pending:
            for dag_id in list(pending):
                dag = self.dag(dag_id)
                if dag is not None:
                    if dag.get("is_paused"):
                        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
                    pending.remove(dag_id)
            if pending and time.monotonic() > deadline:
                errors = self.request("GET", "/importErrors").get("import_errors", [])
                raise DistError(
                    f"DAGs {pending} not parsed within {timeout:.0f}s; import errors: "
                    f"{[e.get('stack_trace', '')[-300:] for e in errors] or 'none'}; {self.where_logs}"
                )
            if pending:
                time.sleep(2)

    def trigger(
        self,
        dag_id: str,
        conf: dict[str, Any] | None = None,
        run_id: str | None = None,
        logical_date: dt.datetime | None = None,
    ) -> str:
        body: dict[str, Any] = {"conf": conf or {}, "logical_date": logical_date.isoformat() if logical_date else None}
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        found = self.request(
            "GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances", params={"limit": 100}
        )
        return {ti["task_id"]: ti for ti in found["task_instances"]}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        found = self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/tries")
        return sorted(found["task_instances"], key=lambda ti: ti["try_number"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.request(
            "GET",
            f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"stringify": "false", "deserialize": "true"},
        )
        return entry["value"]

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float,
        observe: Callable[[dict[str, dict[str, Any]]], None] | None = None,
        poll: float = 2.0,
    ) -> dict[str, Any]:
        """Poll until the run is success or failed; ``observe`` sees the task instances at every poll."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if observe is not None:
                observe(self.task_instances(dag_id, run_id))
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                states = {k: v["state"] for k, v in self.task_instances(dag_id, run_id).items()}
                raise DistError(
                    f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f}s; tasks: {states}; {self.where_logs}"
                )
            time.sleep(poll)

    def wait_for_task(
        self, dag_id: str, run_id: str, task_id: str, accept: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Poll until ``accept(task instance)``; fail early if the run ends first."""
        deadline = time.monotonic() + timeout
        while True:
            tis = self.task_instances(dag_id, run_id)
            ti = tis.get(task_id)
            if ti is not None and accept(ti):
                return ti
            run = self.dag_run(dag_id, run_id)
            if run["state"] in TERMINAL_RUN_STATES or time.monotonic() > deadline:
                states = {k: v["state"] for k, v in tis.items()}
                raise DistError(
                    f"{dag_id} run {run_id}: {task_id} never reached the expected state "
                    f"(run {run['state']}, tasks {states}); {self.where_logs}"
                )
            time.sleep(1.0)


# --------------------------------------------------------------------------- CLI


def run_tests(config: Config, keep: bool, pytest_args: list[str]) -> int:
    """``tests/distributed`` with pytest (it starts a fresh stack and stops it at the end unless ``keep``)."""
    problem = preflight(config)
    if problem:
        print(f"distributed test: {problem}", file=sys.stderr)
        return 2
    alive = running(config)
    if alive:
        print(
            f"distributed test: services are running under {config.paths.state_dir} ({', '.join(alive)}); the test "
            "starts a fresh stack there: run `python -m scripts.distributed down` first",
            file=sys.stderr,
        )
        return 2
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(PROJECT_ROOT / "tests" / "distributed"),
        "-m",
        "distributed",
        "-p",
        "no:cacheprovider",
        "-v",
        *pytest_args,
    ]
    env = {
        **os.environ,
        "NS_DIST_KEEP": "1" if keep else "",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "plugins")]),
    }
    started = time.monotonic()
    code = subprocess.call(command, cwd=PROJECT_ROOT, env=env)
    elapsed = time.monotonic() - started
    print(f"distributed test: {'passed' if code == 0 else 'FAILED'} in {elapsed:.0f}s (wall time)", flush=True)
    if code != 0:
        print(f"distributed test: {config.where_logs()}", flush=True)
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Distributed mode (CeleryExecutor, Postgres, Redis) on loopback.")
    sub = parser.add_subparsers(dest="action", required=True)
    up_parser = sub.add_parser("up", help="start the stack (healthy services are left alone)")
    up_parser.add_argument("--fresh", action="store_true", help="drop/recreate its databases and state dir first")
    down_parser = sub.add_parser("down", help="stop what up started (by pid)")
    down_parser.add_argument("--drop", action="store_true", help="also drop its databases and flush its Redis db")
    sub.add_parser("status", help="show the services")
    sub.add_parser("env", help="print the environment as shell exports")
    test_parser = sub.add_parser("test", help="run tests/distributed on a fresh stack")
    test_parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args, rest = parser.parse_known_args(argv)
    if rest and args.action != "test":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    config = Config.from_env()
    try:
        if args.action == "up":
            started = time.monotonic()
            up(config, fresh=args.fresh)
            print(f"  up in {time.monotonic() - started:.0f}s", flush=True)
        elif args.action == "down":
            down(config, drop=args.drop)
        elif args.action == "status":
            sys.exit(0 if status(config) else 1)
        elif args.action == "env":
            for key, value in sorted(environment(config).items()):
                print(f"export {key}={value!r}")
        else:
            sys.exit(run_tests(config, args.keep, rest))
    except (DistError, stack.StackError) as err:
        sys.exit(f"distributed: {err}")


if __name__ == "__main__":
    main()
