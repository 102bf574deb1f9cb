"""The pinned environment is the one requirements.txt describes, and it lints clean."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_installed_versions_match_requirements():
    pins = _pins(ROOT / "requirements.txt") | _pins(ROOT / "requirements-nodeps.txt")
    assert pins["apache-airflow"].startswith("3.3.")
    mismatched = {name: (pinned, version(name)) for name, pinned in pins.items() if version(name) != pinned}
    assert not mismatched, f"installed versions differ from the pins (run `make venv`): {mismatched}"


def test_requirements_are_in_constraints():
    constraints = _pins(ROOT / "constraints.txt")
    pins = _pins(ROOT / "requirements.txt")
    differing = {
        name: (pinned, constraints.get(name)) for name, pinned in pins.items() if constraints.get(name) != pinned
    }
    assert not differing, f"requirements.txt and constraints.txt disagree (run `make lock`): {differing}"


def test_gx_provider_imports_with_airflow3_structlog():
    """The provider is installed --no-deps (its structlog<25.5 pin conflicts with Airflow 3.3)."""
    from great_expectations_provider.common.errors import GXValidationFailed
    from great_expectations_provider.operators.validate_batch import GXValidateBatchOperator

    assert issubclass(GXValidationFailed, Exception)
    assert GXValidateBatchOperator.__name__ == "GXValidateBatchOperator"
    assert int(version("structlog").split(".")[0]) >= 26


def test_pandas_below_3_for_evidently():
    assert int(version("pandas").split(".")[0]) < 3


def test_ruff_clean_including_airflow_rules():
    for extra in ([], ["--select", "AIR"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", *extra, "."], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:]
