"""The Airflow UI on the embedded stack: ``airflow standalone`` next to moto and MLflow.

``up`` starts and prepares the embedded stack (``scripts.bootstrap.up``: moto, MLflow, migrated
metadata DB, ``airflow_settings.yaml``, buckets), then ``airflow standalone`` (api-server,
scheduler with the LocalExecutor, dag-processor, triggerer) on the same SQLite metadata DB, as a
service of the project's supervisor (``scripts/services.py``: a session, a pid file, a log). It
waits until the UI answers, every component heartbeats and the DAGs are parsed (REST API), then
prints the URL and the login (the simple auth manager's generated password).

* Deferrable operators defer (``[operators] default_deferrable``): the triggerer runs, so the
  S3 sensor waits for the day's drop there instead of holding a worker slot.
* ``make run`` keeps working next to it (it runs its DAG runs itself with ``dag.test()``): the
  scheduler creates no scheduled runs (``[scheduler] use_job_schedule``) and the project's DAGs
  are paused (``airflow dags pause``) before the scheduler starts, so it never picks up a run that
  ``make run`` queued. A run triggered from the UI unpauses its DAG (the trigger dialog's
  "Unpause ... on trigger", ticked by default). ``--schedules`` keeps schedules and pause states.
* ``up`` twice: the second sees the UI running and only says so. ``down`` (or
  ``python -m scripts.stack down``) stops it with the rest of the stack.

Usage: ``python -m scripts.airflow_ui up [--schedules] | down | status``
(``AIRFLOW_PORT`` moves the UI, as ``MOTO_PORT`` / ``MLFLOW_PORT`` move the rest.)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from scripts import bootstrap, services, stack
from scripts.airflow_api import AirflowApi, ApiError
from scripts.services import AIRFLOW_SETTINGS, HOST, Paths, Ports
from tasks.config import DEPLOY_DAG_ID, DRIFT_DAG_ID, TRAINING_DAG_ID
from tasks.supervisor import Service, SupervisorError, http_ok

ADMIN = "admin"
PROJECT_DAGS = (DEPLOY_DAG_ID, DRIFT_DAG_ID, TRAINING_DAG_ID)
HEALTHY_COMPONENTS = ("metadatabase", "scheduler", "dag_processor", "triggerer")


def ui_url(ports: Ports) -> str:
    return f"http://{HOST}:{ports.airflow}"


def password_file(paths: Paths) -> Path:
    """Where the simple auth manager keeps the generated password (its default place in AIRFLOW_HOME)."""
    return paths.airflow_home / "simple_auth_manager_passwords.json.generated"


def ui_environment(
    paths: Paths, ports: Ports, schedules: bool = False, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What ``airflow standalone`` gets on top of the stack's environment.

    Airflow settings already in ``environ`` (default: this process's environment) win over the
    defaults here, except the listening address (it follows ``AIRFLOW_PORT``) and what
    ``schedules`` decides (the stack's own environment unpauses DAGs at creation).
    """
    environ = os.environ if environ is None else environ
    deferrable = "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"
    defaults = {
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": services.local_secret(paths, "api_secret_key", lambda: secrets.token_urlsafe(32)),
        # The LocalExecutor forks this many workers up front (Airflow's default is 32); two cores here.
        "AIRFLOW__CORE__PARALLELISM": "4",
        # The triggerer runs, so deferrable operators (the S3 sensor) defer, as in distributed mode.
        deferrable: AIRFLOW_SETTINGS[deferrable],
        # One admin; the api-server generates its password once into the state folder.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file(paths)),
        # Champions ship to the local model server only: deferred, the EC2 rollout (SSM Run Command)
        # waits through SSM ListCommandInvocations, which moto does not implement (the rollout fails
        # and the deploy rolls back). `make run` (dag.test(), nothing deferred) ships to both.
        "NS_DEPLOY_TARGETS": "local",
    }
    env = {key: environ.get(key, value) for key, value in defaults.items()}
    if not schedules:  # what --schedules decides, whatever the environment (the stack's env.sh says otherwise)
        env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
        env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "True"
    env.update(
        {
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(ports.airflow),
            # Task processes report to the api-server's Task Execution API on this port.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{ui_url(ports)}/execution/",
            # standalone starts its components as `airflow ...`: the venv's airflow first.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", os.defpath)]),
        }
    )
    return env


def components_healthy(ports: Ports) -> bool:
    """The UI answers and the metadata DB, scheduler, dag-processor and triggerer are healthy."""
    import httpx

    try:
        health = httpx.get(f"{ui_url(ports)}/api/v2/monitor/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    page = http_ok(f"{ui_url(ports)}/", timeout=5)
    return page and all((health.get(name) or {}).get("status") == "healthy" for name in HEALTHY_COMPONENTS)


def service(ports: Ports) -> Service:
    return services.airflow_standalone(ports, health_check=lambda: components_healthy(ports))


def login(paths: Paths) -> tuple[str, str | None]:
    """The admin user and its password (None while the api-server has not generated it yet)."""
    try:
        return ADMIN, json.loads(password_file(paths).read_text()).get(ADMIN)
    except (OSError, ValueError):
        return ADMIN, None


def api(paths: Paths, ports: Ports) -> AirflowApi:
    user, password = login(paths)
    if password is None:
        raise SupervisorError(f"no password for {user!r} in {password_file(paths)}; see {paths.logs}")
    return AirflowApi(ui_url(ports), user, password, where_logs=f"see {paths.logs}")


def pause_dags(env: Mapping[str, str]) -> list[str]:
    """Pause every unpaused DAG of the metadata DB (``airflow dags pause``, before the scheduler starts)."""
    paused = services.airflow_json("dags", "pause", "--treat-dag-id-as-regex", "--yes", ".*", env=env)
    return sorted(entry["dag_id"] for entry in paused)


def up(
    paths: Paths | None = None,
    ports: Ports | None = None,
    schedules: bool = False,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Start the stack and ``airflow standalone`` unless already running; return the UI's environment.

    ``environ`` (default: this process's environment) is what the Airflow processes inherit
    before the stack's environment is laid over it (e.g. ``NS_DEPLOY_TARGETS``).
    """
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    base = dict(os.environ if environ is None else environ)
    supervisor = paths.supervisor()
    standalone = service(ports)
    running = supervisor.pid(standalone)
    if running is not None and supervisor.healthy(standalone):
        print(f"  {standalone.name}: already running (pid {running}) at {ui_url(ports)}", flush=True)
        env = {**stack.up(paths, ports), **ui_environment(paths, ports, schedules, base)}  # a no-op when healthy
    else:
        env = {**bootstrap.up(paths, ports), **ui_environment(paths, ports, schedules, base)}
        if not schedules:
            paused = pause_dags({**base, **env})
            if paused:
                print(f"  paused {', '.join(paused)} (a run triggered from the UI unpauses its DAG)", flush=True)
        print(f"  {standalone.name}: {supervisor.start(standalone, env, base)}", flush=True)
    dags = api(paths, ports).wait_for_dags(PROJECT_DAGS, timeout=180)
    states = ", ".join(f"{dag_id} ({'paused' if paused else 'unpaused'})" for dag_id, paused in sorted(dags.items()))
    print(f"  DAGs: {states}", flush=True)
    print_access(paths, ports, env)
    return env


def print_access(paths: Paths, ports: Ports, env: Mapping[str, str]) -> None:
    """URL, login and where things are, with the choices the UI's environment made."""
    user, password = login(paths)
    print(f"\n  Airflow UI     {ui_url(ports)}")
    print(f"  login          {user} / {password}   (kept in {password_file(paths)})")
    print(f"  MLflow UI      http://{HOST}:{ports.mlflow}")
    print(f"  Airflow log    {paths.logs / 'airflow-standalone.log'}   (task logs: {paths.airflow_home / 'logs'})")
    if env.get("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE") == "False":
        print("  schedules      off: runs start when triggered (--schedules keeps them)")
    print(f"  deploy targets {env.get('NS_DEPLOY_TARGETS') or '(none)'}   (NS_DEPLOY_TARGETS)")
    print(f"  stop           {sys.executable} -m scripts.airflow_ui down   (stops the whole stack)", flush=True)


def status(paths: Paths | None = None, ports: Ports | None = None) -> bool:
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    stack_up = stack.status(paths, ports)
    standalone = service(ports)
    healthy = components_healthy(ports)
    pid = paths.supervisor().pid(standalone)
    print(f"  {standalone.name} {'up' if healthy else 'down':5s} pid={pid or '-'} {ui_url(ports)}")
    return stack_up and healthy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The Airflow UI (airflow standalone) on the embedded stack.")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--schedules",
        action="store_true",
        help="let the scheduler create scheduled runs and leave the DAGs' pause state alone (up only)",
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(schedules=args.schedules)
        elif args.action == "down":
            stack.down()
        else:
            sys.exit(0 if status() else 1)
    except (SupervisorError, ApiError, RuntimeError) as err:
        sys.exit(f"airflow_ui: {err}")


if __name__ == "__main__":
    main()
