"""The distributed mode's processes: the services of ``scripts/services.py`` with this mode's configuration.

moto; MLflow on Postgres with its artifacts in the emulator; Airflow's api-server, scheduler,
dag-processor and triggerer; ``workers`` Celery workers (own celery hostnames, small
concurrency); the model server following the champion alias. All run by the project's
supervisor (a session, a pid file and a log each) under the mode's state folder.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import psutil

from scripts import bootstrap, services
from scripts.airflow_api import AirflowApi
from scripts.distributed import backends
from scripts.distributed.config import (
    ADMIN_USER,
    HOSTNAME_CALLABLE,
    HOSTNAME_VAR,
    MLFLOW_ARTIFACT_BUCKET,
    START_HINT,
    Config,
    DistError,
    base_environ,
    environment,
)
from scripts.services import HOST
from scripts.stack import write_env_file
from tasks.config import DEPLOY_DAG_ID, DRIFT_DAG_ID, TRAINING_DAG_ID
from tasks.local_server import serving_environment
from tasks.supervisor import Service, SupervisorError

DAG_IDS = (TRAINING_DAG_ID, DRIFT_DAG_ID, DEPLOY_DAG_ID)
_PING_LOCK = threading.Lock()


def api(config: Config) -> AirflowApi:
    return AirflowApi(config.api_url, ADMIN_USER, config.admin_password(), config.where_logs())


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
    pid = config.paths.supervisor().pid(Service(name=service_name, command=[]))
    if not health or not health.get(component) or pid is None:
        return False
    info = health[component]
    heartbeat = info.get(f"latest_{component}_heartbeat")
    if info.get("status") != "healthy" or not heartbeat:
        return False
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    return dt.datetime.fromisoformat(heartbeat).timestamp() >= started - 1


def _worker_healthy(config: Config, name: str) -> bool:
    node = celery_node(config, name)
    return node in celery_ping(config, [node])


def _model_server(config: Config, env: dict[str, str]) -> Service:
    settings = bootstrap.configured_settings({**base_environ(), **env})
    environment = serving_environment(
        tracking_uri=env["MLFLOW_TRACKING_URI"],
        model_name=settings.model_name or settings.dataset,
        dataset=settings.dataset,
        api_key=env["NS_SERVING_API_KEY"],
        admin_api_key=env["NS_SERVING_ADMIN_API_KEY"],
        prediction_log_bucket=settings.lake_bucket,
        aws_options={
            "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"],
            "endpoint_url": env["AWS_ENDPOINT_URL"],
        },
    )
    # Follow `champion` as the DAGs move it (no deploy task reaches it), as compose's serving container.
    environment["ALIAS_POLL_SECONDS"] = "30"
    return services.model_server(HOST, config.ports.serving, environment, start_hint=START_HINT)


def service_list(config: Config) -> list[Service]:
    """In start order; ``down`` stops them in reverse."""
    hint = START_HINT
    env = environment(config)
    moto = services.moto(config.ports, port_variable="NS_DIST_MOTO_PORT", start_hint=hint)
    mlflow = services.mlflow(
        config.ports,
        config.pg_url(config.databases["mlflow"]),
        f"s3://{MLFLOW_ARTIFACT_BUCKET}",  # as in docker-compose.yaml: artifacts in the S3 emulator
        port_variable="NS_DIST_MLFLOW_PORT",
        start_hint=hint,
        start_timeout=240.0,
    )
    airflow = [
        services.airflow_component(
            "api-server",
            args=("--host", HOST, "--port", str(config.ports.airflow), "--workers", "1"),
            port=config.ports.airflow,
            port_variable="NS_DIST_AIRFLOW_PORT",
            health_path="/api/v2/monitor/health",
            start_hint=hint,
        ),
        services.airflow_component(
            "scheduler",
            port=config.scheduler_health_port,
            port_variable="NS_DIST_SCHEDULER_HEALTH_PORT",
            health_path="/health",
            start_hint=hint,
        ),
        services.airflow_component(
            "dag-processor", health_check=lambda: _job_healthy(config, "dag_processor", "dag-processor")
        ),
        services.airflow_component("triggerer", health_check=lambda: _job_healthy(config, "triggerer", "triggerer")),
    ]
    workers = [
        services.airflow_component(
            "worker",
            service_name=name,
            # Task logs go to the shared AIRFLOW_HOME/logs (the compose stack shares a volume),
            # so the workers serve none: two log servers on one host would need two ports.
            args=(
                "--celery-hostname",
                celery_node(config, name),
                "--concurrency",
                str(config.worker_concurrency),
                "--skip-serve-logs",
            ),  # fmt: skip
            environment={HOSTNAME_VAR: hostname, "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE},
            health_check=functools.partial(_worker_healthy, config, name),
        )
        for name, hostname in config.worker_hostnames.items()
    ]
    return [moto, mlflow, *airflow, *workers, _model_server(config, env)]


def service(config: Config, name: str) -> Service:
    by_name = {s.name: s for s in service_list(config)}
    if name not in by_name:
        raise DistError(f"no service {name!r}; services: {', '.join(by_name)}")
    return by_name[name]


def running(config: Config) -> list[str]:
    """Services of this state dir whose pid file names a live process of ours."""
    supervisor = config.paths.supervisor()
    return [svc.name for svc in service_list(config) if supervisor.pid(svc) is not None]


def _start_all(config: Config, chosen: list[Service], env: dict[str, str]) -> None:
    """Start ``chosen`` in parallel (they wait for their own health); fail naming every one that did not come up."""
    supervisor, base = config.paths.supervisor(), base_environ()
    errors = []
    with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
        futures = {pool.submit(supervisor.start, svc, env, base): svc for svc in chosen}
        for future in as_completed(futures):
            try:
                print(f"  {futures[future].name}: {future.result()}", flush=True)
            except SupervisorError as err:
                errors.append(str(err))
    if errors:
        raise DistError("\n".join(errors) + f"\n{config.where_logs()}")


def _bootstrap(config: Config, env: dict[str, str]) -> None:
    """Migrate Airflow's database and apply airflow_settings.yaml (scripts/bootstrap.py), with the output logged."""
    log = config.paths.logs / "bootstrap.log"
    try:
        bootstrap.migrate_airflow({**base_environ(), **env})
    except RuntimeError as err:
        log.write_text(str(err))
        raise DistError(f"bootstrap failed (see {log}): {str(err)[-1500:]}") from err


def _write_password_file(config: Config) -> None:
    """The simple auth manager's users file: the admin with this state dir's generated password."""
    config.password_file.parent.mkdir(parents=True, exist_ok=True)
    config.password_file.write_text(json.dumps({ADMIN_USER: config.admin_password()}) + "\n")
    config.password_file.chmod(0o600)


def up(config: Config, fresh: bool = False, wait_for_dags: bool = True) -> dict[str, str]:
    """Start every service (those already healthy are left alone); return the stack's environment."""
    problem = backends.preflight(config)
    if problem:
        raise DistError(problem)
    if fresh:
        alive = running(config)
        if alive:
            raise DistError(
                f"--fresh with services running ({', '.join(alive)}) under {config.paths.state_dir}; "
                "run `python -m scripts.distributed down` first"
            )
        dropped = backends.drop_databases(config)
        keys = backends.flush_redis(config)
        shutil.rmtree(config.paths.state_dir, ignore_errors=True)
        print(
            f"  fresh: dropped {', '.join(dropped) or 'no databases'}; flushed Redis db {config.redis_db} "
            f"({keys} keys); removed {config.paths.state_dir}",
            flush=True,
        )
    for folder in (config.paths.pids, config.paths.logs, config.paths.airflow_home):
        folder.mkdir(parents=True, exist_ok=True)
    created = backends.create_databases(config)
    print(
        f"  postgres: {', '.join(config.databases.values())} ({'created ' + ', '.join(created) if created else 'present'})"
    )
    print(f"  redis: {config.broker_url}", flush=True)
    env = environment(config)
    _write_password_file(config)
    write_env_file(
        config.paths, env, "source this file to use the distributed stack (scripts/distributed) from a shell"
    )
    by_name = {svc.name: svc for svc in service_list(config)}
    _start_all(config, [by_name["moto"]], env)
    bootstrap.create_buckets({**base_environ(), **env}, extra=(MLFLOW_ARTIFACT_BUCKET,))
    # MLflow's and Airflow's schema migrations are independent: run them side by side.
    with ThreadPoolExecutor(max_workers=2) as pool:
        migrate = pool.submit(_bootstrap, config, env)
        _start_all(config, [by_name["mlflow"]], env)
        migrate.result()
    _start_all(config, [by_name["api-server"]], env)
    _start_all(config, [svc for name, svc in by_name.items() if name not in ("moto", "mlflow", "api-server")], env)
    if wait_for_dags:
        api(config).wait_for_dags(DAG_IDS, timeout=240, unpause=True)
        print(f"  dags: {', '.join(DAG_IDS)} parsed and unpaused", flush=True)
    print(
        f"  Airflow UI/API {config.api_url} (user {ADMIN_USER}, password in {config.password_file}); "
        f"MLflow http://{HOST}:{config.ports.mlflow}; env: source {config.paths.env_file}\n  {config.where_logs()}",
        flush=True,
    )
    return env


def start(config: Config, names: list[str]) -> None:
    """(Re)start the named services (e.g. a worker after it was killed)."""
    _start_all(config, [service(config, name) for name in names], environment(config))


def kill(config: Config, name: str) -> int:
    """SIGKILL a service at once, as if its machine died: its whole session, the task processes under it too."""
    try:
        return config.paths.supervisor().kill(service(config, name))
    except SupervisorError as err:
        raise DistError(str(err)) from err


def down(config: Config, drop: bool = False) -> None:
    """Stop what ``up`` started (by pid file), newest first; with ``drop``, also drop its databases and Redis db."""
    supervisor = config.paths.supervisor()
    for svc in reversed(service_list(config)):
        print(f"  {svc.name}: {supervisor.stop(svc)}", flush=True)
    if drop:
        problem = backends.preflight(config)
        if problem:
            raise DistError(f"cannot drop: {problem}")
        dropped = backends.drop_databases(config)
        keys = backends.flush_redis(config)
        print(
            f"  dropped {', '.join(dropped) or 'no databases'}; flushed Redis db {config.redis_db} ({keys} keys)",
            flush=True,
        )


def status(config: Config) -> bool:
    supervisor = config.paths.supervisor()
    all_up = True
    for svc in service_list(config):
        pid = supervisor.pid(svc)
        healthy = pid is not None and supervisor.healthy(svc)
        all_up &= healthy
        where = (
            svc.url
            if svc.port is not None
            else ("celery " + celery_node(config, svc.name) if "worker" in svc.name else "")
        )
        print(f"  {svc.name:14s} {'up' if healthy else 'down':5s} pid={pid or '-':<8} {where}")
    problem = backends.preflight(config)
    if problem:
        print(f"  {problem}")
        return False
    owned = ", ".join(backends.existing_databases(config)) or "none"
    print(f"  postgres       databases {owned} of {', '.join(config.databases.values())}")
    print(f"  redis          {config.broker_url} ({backends.redis_client(config).dbsize()} keys)")
    health = api_health(config)
    if health:
        print("  airflow health " + ", ".join(f"{k}={v.get('status')}" for k, v in health.items() if v))
    print(f"  {config.where_logs()}")
    return all_up
