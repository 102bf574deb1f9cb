"""Apply ``airflow_settings.yaml`` (Astro CLI format) to the Airflow metadata database.

There is no Astro CLI here, so this does what ``astro dev start`` does with the file:
upsert every connection, pool and variable it lists. ``${NAME:-default}`` in a value
is expanded from the environment first. Run it after ``airflow db migrate``::

    python -m scripts.airflow_settings [path/to/airflow_settings.yaml]
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def expand(value: Any, environ: dict[str, str] | None = None) -> Any:
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


def load_settings(path: Path, environ: dict[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    raw = yaml.safe_load(path.read_text()) or {}
    section = expand(raw.get("airflow") or {}, environ)
    return {key: [item for item in (section.get(key) or []) if item] for key in ("connections", "pools", "variables")}


def apply(path: Path = PROJECT_ROOT / "airflow_settings.yaml") -> dict[str, int]:
    """Upsert the file's connections, pools and variables; return how many of each."""
    # The metadata-DB models, not airflow.sdk's: this is setup code that writes the
    # database directly, as `airflow connections/variables/pools import` would.
    from airflow.models.connection import Connection  # noqa: AIR311
    from airflow.models.pool import Pool
    from airflow.models.variable import Variable  # noqa: AIR311
    from airflow.utils.session import create_session

    settings = load_settings(path)
    with create_session() as session:
        for item in settings["connections"]:
            extra = item.get("conn_extra")
            fields = dict(
                conn_type=item["conn_type"],
                host=item.get("conn_host"),
                schema=item.get("conn_schema"),
                login=item.get("conn_login"),
                password=item.get("conn_password"),
                port=item.get("conn_port"),
                extra=json.dumps(extra) if isinstance(extra, dict) else extra,
            )
            existing = session.query(Connection).filter(Connection.conn_id == item["conn_id"]).one_or_none()
            if existing is None:
                session.add(Connection(conn_id=item["conn_id"], **fields))
            else:
                for key, value in fields.items():
                    setattr(existing, key, value)
        for item in settings["variables"]:
            Variable.set(item["variable_name"], item["variable_value"], session=session)
        for item in settings["pools"]:
            Pool.create_or_update_pool(
                name=item["pool_name"],
                slots=int(item["pool_slot"]),
                description=item.get("pool_description") or "",
                include_deferred=False,
                session=session,
            )
    return {key: len(value) for key, value in settings.items()}


if __name__ == "__main__":
    counts = apply(Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT_ROOT / "airflow_settings.yaml")
    print("  airflow settings: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
