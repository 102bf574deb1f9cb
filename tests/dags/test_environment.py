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


REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")
DEV_TOOLS = ("pytest", "moto", "ruff", "schemathesis", "playwright")


def test_installed_versions_match_requirements():
    pins = (
        _pins(ROOT / "requirements.txt")
        | _pins(ROOT / "requirements-dev.txt")
        | _pins(ROOT / "requirements-nodeps.txt")
    )
    assert pins["apache-airflow"].startswith("3.3.")
    mismatched = {name: (pinned, version(name)) for name, pinned in pins.items() if version(name) != pinned}
    assert not mismatched, f"installed versions differ from the pins (run `make venv`): {mismatched}"


def test_requirements_are_in_constraints():
    constraints = _pins(ROOT / "constraints.txt")
    for name in REQUIREMENTS:
        pins = _pins(ROOT / name)
        differing = {
            dist: (pinned, constraints.get(dist)) for dist, pinned in pins.items() if constraints.get(dist) != pinned
        }
        assert not differing, f"{name} and constraints.txt disagree (run `make lock`): {differing}"


def test_dev_tools_stay_out_of_the_images_requirements():
    image, dev = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-dev.txt")
    assert not set(DEV_TOOLS) & set(image), "requirements.txt is what the Airflow image installs: no dev tools"
    assert set(DEV_TOOLS) <= set(dev)


def test_gx_provider_works_with_airflow3_structlog():
    """The provider is installed --no-deps (its structlog<25.5 pin conflicts with Airflow 3.3): it still
    takes the arguments the project's operator passes and builds as an Airflow 3 operator."""
    import inspect

    from airflow.sdk import BaseOperator
    from great_expectations_provider.operators.validate_batch import GXValidateBatchOperator

    from network_security.operators import SnapshotValidationOperator

    parameters = inspect.signature(GXValidateBatchOperator.__init__).parameters
    assert {"configure_batch_definition", "configure_expectations", "result_format", "context_type"} <= set(parameters)
    operator = SnapshotValidationOperator(task_id="validate")
    assert isinstance(operator, BaseOperator) and operator.result_format == "SUMMARY"
    assert int(version("structlog").split(".")[0]) >= 26


def test_pandas_below_3_for_evidently():
    assert int(version("pandas").split(".")[0]) < 3


def test_ruff_clean_including_airflow_rules():
    for extra in ([], ["--select", "AIR"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", *extra, "."], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:]
