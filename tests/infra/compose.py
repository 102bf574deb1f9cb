"""Reading docker-compose.yaml the way Compose does, for the infra tests.

PyYAML resolves the ``<<`` merge keys of the ``x-`` anchors; ``interpolate`` does Compose's
variable substitution (``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}``,
``${NAME?error}``, ``$NAME`` and the ``$$`` escape) from a mapping such as ``.env.example``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

# One substitution: $$ (escape), ${NAME<op>arg} or $NAME.
_VARIABLE = re.compile(
    r"\$(?:(?P<escape>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(KeyError):
    """A required variable (``${NAME:?...}``) is unset or empty."""


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``NAME=value`` lines; comments and blank lines are skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution, recursively through mappings and lists."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group("escape"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":-" and not current:
            return arg
        if op == "-" and current is None:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def variables(value: Any) -> list[re.Match]:
    """Every ``${...}`` / ``$NAME`` reference in a value (recursively), escapes excluded."""
    if isinstance(value, dict):
        return [m for item in value.values() for m in variables(item)]
    if isinstance(value, list):
        return [m for item in value for m in variables(item)]
    if not isinstance(value, str):
        return []
    return [m for m in _VARIABLE.finditer(value) if not m.group("escape")]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (Compose accepts a mapping or ``NAME=value`` list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{dependency: condition}``; the short list form means ``service_started``."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}
