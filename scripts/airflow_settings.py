"""Apply ``airflow_settings.yaml`` (Astro CLI format) to an Airflow, through Airflow's own CLI.

There is no Astro CLI here, so this does what ``astro dev start`` does with the file: it expands
``${NAME:-default}`` from the environment, writes the connections, variables and pools as the
files ``airflow connections import``, ``airflow variables import`` and ``airflow pools import``
read (in a private temporary folder: they hold passwords), and runs those three commands, which
upsert. A pool named with ``{dataset}`` (``training_{dataset}``) becomes one pool per dataset spec
under ``include/datasets/``, so onboarding a dataset needs no entry here. Run it after ``airflow db migrate``::

    python -m scripts.airflow_settings [path/to/airflow_settings.yaml]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_FILE = PROJECT_ROOT / "airflow_settings.yaml"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def expand(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Expand ``${NAME}`` / ``${NAME:-default}`` in strings, recursively; fail on unset names without default."""
    environ = os.environ if environ is None else environ
    if isinstance(value, str):

        def substitute(match: re.Match) -> str:
            name, default = match.group("name"), match.group("default")
            if name in environ:
                return environ[name]
            if default is None:
                raise KeyError(f"airflow_settings.yaml uses ${{{name}}} but {name} is not set and has no default")
            return default

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, environ) for v in value]
    return value


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    raw = yaml.safe_load(path.read_text()) or {}
    section = expand(raw.get("airflow") or {}, environ)
    return {key: [item for item in (section.get(key) or []) if item] for key in ("connections", "pools", "variables")}


def import_files(
    settings: Mapping[str, list[dict[str, Any]]], datasets: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The file contents the three ``airflow ... import`` commands take, from the Astro-format settings.

    Args:
        settings: The ``airflow:`` section of ``airflow_settings.yaml``, expanded.
        datasets: The dataset specs per-dataset pools are made for (default: ``include/datasets/``).
    """
    if datasets is None:
        from tasks.dataset_spec import available_datasets

        datasets = available_datasets()
    connections = {}
    for item in settings["connections"]:
        extra = item.get("conn_extra")
        fields = {
            "conn_type": item["conn_type"],
            "host": item.get("conn_host"),
            "schema": item.get("conn_schema"),
            "login": item.get("conn_login"),
            "password": item.get("conn_password"),
            "port": int(item["conn_port"]) if item.get("conn_port") not in (None, "") else None,
            "extra": json.dumps(extra) if isinstance(extra, dict) else extra,
        }
        connections[item["conn_id"]] = {key: value for key, value in fields.items() if value not in (None, "")}
    variables = {item["variable_name"]: item["variable_value"] for item in settings["variables"]}
    pools = {}
    for item in settings["pools"]:
        # ``training_{dataset}``: one pool per dataset, ``{dataset}`` filled in its name and description.
        each = datasets if "{dataset}" in item["pool_name"] else [None]
        for dataset in each:
            name, description = item["pool_name"], item.get("pool_description") or ""
            if dataset is not None:
                name, description = name.replace("{dataset}", dataset), description.replace("{dataset}", dataset)
            pools[name] = {"slots": int(item["pool_slot"]), "description": description, "include_deferred": False}
    return {"connections": connections, "variables": variables, "pools": pools}


def commands(folder: Path) -> list[list[str]]:
    """The CLI commands that upsert the files written to ``folder``."""
    airflow = str(Path(sys.executable).parent / "airflow")
    return [
        [airflow, "connections", "import", "--overwrite", str(folder / "connections.json")],
        [airflow, "variables", "import", "--action-on-existing-key", "overwrite", str(folder / "variables.json")],
        [airflow, "pools", "import", str(folder / "pools.json")],
    ]


def apply(path: Path = SETTINGS_FILE, environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Upsert the file's connections, pools and variables with Airflow's CLI; return how many of each.

    Raises:
        RuntimeError: A command failed; the message carries its output.
    """
    environ = dict(os.environ if environ is None else environ)
    files = import_files(load_settings(path, environ))
    with tempfile.TemporaryDirectory(prefix="ns-airflow-settings-") as folder:
        for name, content in files.items():
            target = Path(folder) / f"{name}.json"
            target.write_text(json.dumps(content))
            target.chmod(0o600)
        for command in commands(Path(folder)):
            done = subprocess.run(command, env=environ, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"`airflow {' '.join(command[1:3])}` failed:\n{done.stdout[-1500:]}{done.stderr[-3000:]}"
                )
    return {name: len(content) for name, content in files.items()}


if __name__ == "__main__":
    counts = apply(Path(sys.argv[1]) if len(sys.argv) > 1 else SETTINGS_FILE)
    print("  airflow settings: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
