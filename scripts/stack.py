"""The embedded local stack's processes: AWS emulator (moto) and MLflow tracking, on loopback.

All state lives under one git-ignored folder (``.state/`` unless ``NS_STATE_DIR`` says
otherwise). The services are declared in ``scripts/services.py`` and run by the project's one
supervisor (``tasks/supervisor.py``: a session, a pid file and a log each), so every command is
safe to repeat: ``up`` twice leaves healthy services alone, ``down`` twice has nothing to stop, a
stale pid file is removed, a port held by our own earlier process is adopted, and a port held by
anything else stops ``up`` with a message naming the process and the variable that moves it.

``down`` stops everything this state folder runs: ``make airflow``'s standalone, the model
servers the deploy tasks started (first: they flush their prediction log), MLflow, moto.
Preparing Airflow for the DAGs (metadata DB, ``airflow_settings.yaml``, buckets) is
``scripts/bootstrap.py``, on top of this.

Usage: ``python -m scripts.stack up|down|status|env [--only moto mlflow]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts import services
from scripts.services import HOST, Paths, Ports
from tasks.local_server import LocalServer
from tasks.supervisor import SupervisorError


def write_env_file(paths: Paths, env: dict[str, str], header: str) -> None:
    """``env.sh``: the stack's environment as shell exports (``source`` it to use the stack's Airflow)."""
    lines = [f"export {key}={value!r}" for key, value in sorted(env.items()) if key != "PATH"]
    lines.append(f'export PATH={str(Path(sys.executable).parent)!r}:"$PATH"')
    paths.env_file.write_text(f"# {header}\n" + "\n".join(lines) + "\n")


def up(paths: Paths | None = None, ports: Ports | None = None, only: list[str] | None = None) -> dict[str, str]:
    """Start the embedded services (all, or those named in ``only``); return the stack environment."""
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    for folder in (paths.pids, paths.logs, paths.airflow_home, paths.mlflow_dir / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    env = services.stack_environment(paths, ports)
    supervisor = paths.supervisor()
    for service in services.embedded(paths, ports):
        if only is None or service.name in only:
            print(f"  {service.name}: {supervisor.start(service, env)}", flush=True)
    write_env_file(paths, env, "source this file to use the embedded stack's Airflow and AWS emulator")
    return env


def model_servers(paths: Paths) -> list[LocalServer]:
    """The model servers the deploy tasks started on this stack (one pid file per port)."""
    servers = []
    for pid_file in sorted(paths.serving_dir.glob("serving-*.pid")):
        port = int(pid_file.stem.rsplit("-", 1)[1])
        servers.append(LocalServer(paths.serving_dir, HOST, port, {}, owner_id=paths.owner_id))
    return servers


def down(paths: Paths | None = None, ports: Ports | None = None, only: list[str] | None = None) -> None:
    """Stop what runs on this state folder: the UI and the model servers first, then MLflow and moto."""
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    supervisor = paths.supervisor()
    if only is None:
        standalone = services.airflow_standalone(ports, health_check=lambda: False)
        if supervisor.pid_file(standalone).exists():
            print(f"  {standalone.name}: {supervisor.stop(standalone)}", flush=True)
        for server in model_servers(paths):
            print(f"  model server :{server.port}: {server.stop()}", flush=True)
    for service in reversed(services.embedded(paths, ports)):
        if only is None or service.name in only:
            print(f"  {service.name}: {supervisor.stop(service)}", flush=True)


def status(paths: Paths | None = None, ports: Ports | None = None) -> bool:
    paths = paths or Paths.from_env()
    ports = ports or Ports.from_env()
    supervisor = paths.supervisor()
    all_up = True
    for service in services.embedded(paths, ports):
        healthy = supervisor.healthy(service)
        all_up &= healthy
        print(
            f"  {service.name:8s} {'up' if healthy else 'down':5s} pid={supervisor.pid(service) or '-'} {service.url}"
        )
    for server in model_servers(paths):
        print(f"  {'model server':8s} {'up' if server.healthy() else 'down':5s} pid={server.pid() or '-'} {server.url}")
    return all_up


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The embedded stack's processes (moto + MLflow).")
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
            for key, value in sorted(services.stack_environment(Paths.from_env(), Ports.from_env()).items()):
                print(f"export {key}={value!r}")
    except SupervisorError as err:
        sys.exit(f"stack: {err}")


if __name__ == "__main__":
    main()
