"""The Airflow UI on the embedded stack: ``airflow standalone`` next to moto and MLflow.

``up`` starts the embedded stack (``scripts.stack.up``: moto, MLflow, migrated metadata DB,
``airflow_settings.yaml``, buckets), then ``airflow standalone`` (api-server, scheduler with
the LocalExecutor, dag-processor, triggerer) on the same SQLite metadata DB, the project's
DAGs and plugins, in a session of its own with a pid file and a log under the state folder.
It waits until the UI answers, every component heartbeats and the DAGs are parsed, then prints
the URL and the login (the simple auth manager's generated password, kept in the state folder).

* Deferrable operators defer (``[operators] default_deferrable``): the triggerer runs, so the
  S3 sensor waits for the day's drop there instead of holding a worker slot.
* ``make run`` keeps working next to it (it runs its DAG runs itself with ``dag.test()``): the
  scheduler creates no scheduled runs (``[scheduler] use_job_schedule``) and the project's DAGs
  are paused when the UI starts, so it never picks up a run that ``make run`` queued (the drift
  check's retraining run). A run triggered from the UI unpauses its DAG (the trigger dialog's
  "Unpause ... on trigger", ticked by default). ``--schedules`` keeps schedules and pause
  states as they are instead.
* ``up`` twice: the second sees the UI running and only says so. ``down`` stops what ``up``
  started (standalone's session: its components and the task processes under them), then the
  rest as ``python -m scripts.stack down`` does (model servers, MLflow, moto);
  ``python -m scripts.stack down`` stops the UI too.

Usage: ``python -m scripts.airflow_ui up [--schedules] | down | status``
(``AIRFLOW_PORT`` moves the UI, as ``MOTO_PORT`` / ``MLFLOW_PORT`` move the rest.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from scripts import stack
from scripts.stack import HOST, PROJECT_ROOT, Paths, Ports, Service, StackError

NAME = "airflow-standalone"
ADMIN = "admin"
# The DAG files of dags/ (one DAG each); ``up`` waits until the dag-processor has parsed them.
PROJECT_DAGS = ("network_security_deploy", "network_security_drift", "network_security_training")
START_TIMEOUT = 300.0  # standalone starts four Airflow processes at once: slow on two busy cores
STOP_TIMEOUT = 30.0


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
    url = ui_url(ports)
    defaults = {
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": stack._local_secret(paths, "api_secret_key", lambda: secrets.token_urlsafe(32)),
        # The LocalExecutor forks this many workers up front (Airflow's default is 32); two cores here.
        "AIRFLOW__CORE__PARALLELISM": "4",
        # The triggerer runs, so deferrable operators (the S3 sensor, the SSM rollout) defer.
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
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
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            # standalone starts its components as `airflow ...`: the venv's airflow first.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", os.defpath)]),
        }
    )
    return env


def _get_json(url: str, token: str | None = None, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def components_healthy(ports: Ports) -> bool:
    """The UI answers and the metadata DB, scheduler, dag-processor and triggerer are healthy."""
    try:
        health = _get_json(f"{ui_url(ports)}/api/v2/monitor/health")
        with urllib.request.urlopen(f"{ui_url(ports)}/", timeout=5) as response:
            page = response.status == 200
    except (OSError, ValueError):
        return False
    components = ("metadatabase", "scheduler", "dag_processor", "triggerer")
    return page and all((health.get(name) or {}).get("status") == "healthy" for name in components)


def service(paths: Paths, ports: Ports) -> Service:
    return Service(
        name=NAME,
        port=ports.airflow,
        port_variable="AIRFLOW_PORT",
        command=[str(Path(sys.executable).parent / "airflow"), "standalone"],
        health_path="/api/v2/monitor/health",
        start_timeout=START_TIMEOUT,
        health_check=lambda: components_healthy(ports),
        start_hint="python -m scripts.airflow_ui up",
    )


def login(paths: Paths) -> tuple[str, str | None]:
    """The admin user and its password (None while the api-server has not generated it yet)."""
    try:
        return ADMIN, json.loads(password_file(paths).read_text()).get(ADMIN)
    except (OSError, ValueError):
        return ADMIN, None


def api_token(ports: Ports, user: str, password: str) -> str:
    """A JWT for the REST API from the simple auth manager (POST /auth/token)."""
    request = urllib.request.Request(
        f"{ui_url(ports)}/auth/token",
        data=json.dumps({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["access_token"]


def wait_for_dags(paths: Paths, ports: Ports, timeout: float = 180.0) -> dict[str, bool]:
    """Wait until the dag-processor has registered the project's DAGs; return {dag_id: is_paused}."""
    user, password = login(paths)
    if password is None:
        raise StackError(f"no password for {user!r} in {password_file(paths)}; see {paths.logs / (NAME + '.log')}")
    token = api_token(ports, user, password)
    deadline = time.monotonic() + timeout
    while True:
        dags = _get_json(f"{ui_url(ports)}/api/v2/dags?limit=100", token)["dags"]
        found = {dag["dag_id"]: dag["is_paused"] for dag in dags}
        if all(dag_id in found for dag_id in PROJECT_DAGS):
            return found
        errors = _get_json(f"{ui_url(ports)}/api/v2/importErrors", token)["import_errors"]
        if errors:
            detail = "\n".join(f"{e['filename']}: {e['stack_trace'].strip().splitlines()[-1]}" for e in errors)
            raise StackError(f"the DAGs do not import:\n{detail}")
        if time.monotonic() > deadline:
            missing = sorted(set(PROJECT_DAGS) - set(found))
            raise StackError(f"DAGs {missing} not parsed within {timeout:.0f}s; see {paths.logs / (NAME + '.log')}")
        time.sleep(2)


def pause_all_dags() -> list[str]:
    """Pause every unpaused DAG of the metadata DB the environment points at; return their ids."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        unpaused = session.query(DagModel).filter(DagModel.is_paused.is_(False)).all()
        for dag in unpaused:
            dag.is_paused = True
        return sorted(dag.dag_id for dag in unpaused)


def _pause_dags(env: Mapping[str, str]) -> list[str]:
    """``pause_all_dags`` in a subprocess: Airflow reads its configuration (this stack's) at import."""
    code = "from scripts.airflow_ui import pause_all_dags; print(','.join(pause_all_dags()))"
    done = subprocess.run([sys.executable, "-c", code], env=dict(env), cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"pausing the DAGs failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    return [dag_id for dag_id in (lines[-1] if lines else "").split(",") if dag_id]


def running(paths: Paths, ports: Ports) -> int | None:
    """The pid of our standalone when it runs and its api-server answers, else None."""
    pid = stack._read_pid(paths, service(paths, ports))
    if pid is None:
        return None
    try:
        _get_json(f"{ui_url(ports)}/api/v2/monitor/health")
    except (OSError, ValueError):
        return None
    return pid


def _check_port_free(paths: Paths, ports: Ports) -> None:
    """Fail before starting anything when another program holds the UI's port (ours is adopted later)."""
    holder = stack._listener(ports.airflow)
    if holder is not None and not stack._is_ours(holder, paths):
        raise StackError(
            f"port {ports.airflow} is in use by pid {holder.pid} ({' '.join(holder.cmdline()[:3])}); "
            f"choose another, e.g. `AIRFLOW_PORT={ports.airflow + 1} python -m scripts.airflow_ui up`"
        )


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
    pid = running(paths, ports)
    if pid is not None:
        print(f"  {NAME}: already running (pid {pid}) at {ui_url(ports)}; nothing to start", flush=True)
        env = stack.up(paths, ports, only=["moto", "mlflow"])  # a no-op when they are healthy
    else:
        _check_port_free(paths, ports)
        env = stack.up(paths, ports)
    env = {**env, **ui_environment(paths, ports, schedules, base)}
    if pid is None:
        if not schedules:
            paused = _pause_dags({**base, **env})
            if paused:
                print(f"  paused {', '.join(paused)} (a run triggered from the UI unpauses its DAG)", flush=True)
        started = stack.start_service(service(paths, ports), paths, env, base_environ=base)
        print(f"  {NAME}: {started}", flush=True)
    dags = wait_for_dags(paths, ports)
    states = ", ".join(f"{dag_id} ({'paused' if paused else 'unpaused'})" for dag_id, paused in sorted(dags.items()))
    print(f"  DAGs: {states}", flush=True)
    print_access(paths, ports, env if pid is None else None)
    return env


def print_access(paths: Paths, ports: Ports, env: Mapping[str, str] | None = None) -> None:
    """URL, login and where things are; with the environment ``up`` started Airflow with, its choices."""
    user, password = login(paths)
    print(f"\n  Airflow UI     {ui_url(ports)}")
    print(f"  login          {user} / {password}   (kept in {password_file(paths)})")
    print(f"  MLflow UI      http://{HOST}:{ports.mlflow}")
    print(f"  Airflow log    {paths.logs / (NAME + '.log')}   (task logs: {paths.airflow_home / 'logs'})")
    if env is not None:
        if env.get("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE") == "False":
            print("  schedules      off: runs start when triggered (--schedules keeps them)")
        print(f"  deploy targets {env.get('NS_DEPLOY_TARGETS') or '(none)'}   (NS_DEPLOY_TARGETS)")
    print(f"  stop           {sys.executable} -m scripts.airflow_ui down   (stops the whole stack)", flush=True)


def _session(pid: int) -> list[psutil.Process]:
    """Live processes in the session of ``pid``: standalone, its components, the tasks under them.

    ``up`` starts standalone as a session leader. Task processes get process groups of their own
    (the Task SDK's supervisor does that), so the session, not the process group, holds all of
    it, even after standalone itself died. Model servers started by deploy tasks leave it (a
    session of their own): ``stack.down`` stops them.
    """
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


def stop(paths: Paths, timeout: float = STOP_TIMEOUT) -> str:
    """Stop what ``up`` started: SIGTERM (standalone stops its components), SIGKILL to what is left after ``timeout``."""
    pid_file = paths.pids / f"{NAME}.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return "not running"
    members = _session(pid)
    # Ours when one of them carries this stack's id (some processes overwrite their environment
    # with their title; a stale pid file may name a pid another program uses now).
    if not any(stack._is_ours(process, paths) for process in members):
        pid_file.unlink(missing_ok=True)
        return f"not running (removed the stale pid file of pid {pid})"
    try:
        leader = any(process.pid == pid for process in members) and os.getpgid(pid) == pid
    except ProcessLookupError:
        leader = False
    if leader:
        os.killpg(pid, signal.SIGTERM)  # standalone and its components; they end their tasks
    else:  # standalone is gone (or was adopted): its processes one by one
        for process in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
    seen = {process.pid for process in members}
    began = time.monotonic()
    while members and time.monotonic() < began + timeout:
        psutil.wait_procs(members, timeout=1)
        members = _session(pid)  # and whatever was started meanwhile
        seen.update(process.pid for process in members)
    for process in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(members, timeout=5)
    pid_file.unlink(missing_ok=True)
    killed = f", {len(members)} killed after {timeout:.0f}s" if members else ""
    return f"stopped (pid {pid}, {len(seen)} processes in {time.monotonic() - began:.0f}s{killed})"


def down(paths: Paths | None = None, ports: Ports | None = None) -> None:
    """Stop the UI, then the stack (model servers, MLflow, moto) as ``scripts.stack down`` does."""
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    stack.down(paths, ports)  # stops the UI first (see stack.down)


def status(paths: Paths | None = None, ports: Ports | None = None) -> bool:
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    stack_up = stack.status(paths, ports)
    pid = stack._read_pid(paths, service(paths, ports))
    healthy = components_healthy(ports)
    print(f"  {NAME:8s} {'up' if healthy else 'down':5s} pid={pid or '-'} {ui_url(ports)}")
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
            down()
        else:
            sys.exit(0 if status() else 1)
    except StackError as err:
        sys.exit(f"airflow_ui: {err}")


if __name__ == "__main__":
    main()
