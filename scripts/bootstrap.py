"""Prepare a stack for the DAGs: Airflow metadata DB, ``airflow_settings.yaml``, buckets.

On top of ``scripts/stack.py`` (which only runs processes): ``up`` starts the embedded stack and
prepares it, which is what ``make stack-up`` and every tool that runs the DAGs need. Idempotent:
``airflow db migrate`` is a no-op on a current database, the settings are upserted with Airflow's
CLI (``scripts/airflow_settings.py``), buckets are created only when missing. Compose's
``airflow-init`` runs the same steps.

Usage: ``python -m scripts.bootstrap [up]`` (``up`` is the default).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping

from scripts import airflow_settings, services, stack
from scripts.services import Paths, Ports
from tasks import storage
from tasks.config import SETTINGS_VARIABLE, Settings
from tasks.supervisor import SupervisorError


def configured_settings(env: Mapping[str, str]) -> Settings:
    """The settings the DAGs will see: the Variable from airflow_settings.yaml plus NS_* env."""
    variables = airflow_settings.load_settings(airflow_settings.SETTINGS_FILE, env)["variables"]
    value = next((v["variable_value"] for v in variables if v["variable_name"] == SETTINGS_VARIABLE), "{}")
    return Settings.load(value, environ=env)


def migrate_airflow(env: Mapping[str, str]) -> None:
    """``airflow db migrate``, then ``airflow_settings.yaml`` through the CLI's imports."""
    done = subprocess.run(services.airflow("db", "migrate"), env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`airflow db migrate` failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    counts = airflow_settings.apply(environ=env)
    print("  airflow settings: " + ", ".join(f"{n} {k}" for k, n in counts.items()), flush=True)


def create_buckets(env: Mapping[str, str], extra: tuple[str, ...] = ()) -> list[str]:
    """The raw and lake buckets of the configured settings (and ``extra`` ones), created when missing."""
    settings = configured_settings(env)
    client = services.s3_client(env)
    buckets = [settings.raw_bucket, settings.lake_bucket, *extra]
    for bucket in buckets:
        storage.ensure_bucket(client, bucket)
    print(f"  buckets: {', '.join(buckets)}", flush=True)
    return buckets


def prepare(env: Mapping[str, str]) -> None:
    """Everything the DAGs need from a running stack (its processes already up)."""
    full = {**os.environ, **env}
    migrate_airflow(full)
    create_buckets(full)


def up(paths: Paths | None = None, ports: Ports | None = None) -> dict[str, str]:
    """Start the embedded stack and prepare it for the DAGs; return its environment."""
    env = stack.up(paths, ports)
    prepare(env)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="up", choices=["up"])
    parser.parse_args(argv)
    try:
        up()
    except (SupervisorError, RuntimeError) as err:
        sys.exit(f"stack: {err}")


if __name__ == "__main__":
    main()
