"""Prepare the embedded stack for the DAGs: Airflow metadata DB, settings and buckets.

Idempotent: ``airflow db migrate`` is a no-op on a current database, settings are
upserted, buckets are created only when missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts import stack
from scripts.airflow_settings import PROJECT_ROOT, load_settings
from tasks import storage
from tasks.config import SETTINGS_VARIABLE, Settings


def configured_settings(env: dict[str, str]) -> Settings:
    """The settings the DAGs will see: the Variable from airflow_settings.yaml plus NS_* env."""
    variables = load_settings(PROJECT_ROOT / "airflow_settings.yaml", env)["variables"]
    value = next((v["variable_value"] for v in variables if v["variable_name"] == SETTINGS_VARIABLE), "{}")
    return Settings.load(value, environ=env)


def migrate_airflow(env: dict[str, str]) -> None:
    airflow = str(Path(sys.executable).parent / "airflow")
    for command in ([airflow, "db", "migrate"], [sys.executable, "-m", "scripts.airflow_settings"]):
        done = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command[-3:])}` failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
        if done.stdout.strip():
            print(done.stdout.strip().splitlines()[-1], flush=True)


def create_buckets(env: dict[str, str]) -> list[str]:
    settings = configured_settings(env)
    client = stack.s3_client(env)
    buckets = [settings.raw_bucket, settings.lake_bucket]
    for bucket in buckets:
        storage.ensure_bucket(client, bucket)
    print(f"  buckets: {', '.join(buckets)}", flush=True)
    return buckets
