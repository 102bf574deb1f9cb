"""docker-compose.yaml, the distributed stack, checked without a Docker engine.

The file is read with PyYAML (anchors merged) and interpolated from ``.env.example`` as Compose
would. It is validated against the Compose Specification schema vendored next to this file
(docker-compose 1.29.2's ``compose_spec.json``), and with ``config -q`` of whichever compose CLI
is installed (``docker compose`` v2 or ``docker-compose`` 1.29); none is needed for the rest.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import services as service_model
from scripts.check_secrets import SECRETS
from tasks.config import ENV_PREFIX, SETTINGS_VARIABLE, Settings
from tests.infra import compose
from tests.infra.compose import COMPOSE_FILE, ENV_EXAMPLE, ROOT

SCHEMA = Path(__file__).with_name("compose_spec.json")
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
EXPECTED_SERVICES = AIRFLOW_SERVICES | {"postgres", "redis", "mlflow", "moto", "serving", "secrets-check"}
ONE_SHOT = {"airflow-init", "secrets-check"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN")
# Keys of the embedded stack's environment (scripts/stack.py) that have no place in compose:
# file locations of the embedded state folder, values the image sets, and loopback-only ones.
EMBEDDED_ONLY = {
    "NS_STATE_DIR",  # state folder on the developer's disk
    "NS_MONITORING_DB",  # the SQLite monitoring store; compose uses Postgres (AIRFLOW_CONN_MONITORING_STORE)
    "AIRFLOW_HOME",  # the image's /opt/airflow
    "AIRFLOW__CORE__DAGS_FOLDER",  # the image's default, /opt/airflow/dags
    "AIRFLOW__CORE__PLUGINS_FOLDER",  # the image's default, /opt/airflow/plugins
    "AIRFLOW__CORE__TEMPLATE_SEARCHPATH",  # DAGs set template_searchpath themselves
    "PYTHONPATH",  # set by the Dockerfile
    "NO_PROXY",  # loopback services only
    # Host ports: compose publishes with them (checked in test_host_ports_are_the_embedded_stacks).
    "MOTO_PORT",
    "MLFLOW_PORT",
    "AIRFLOW_PORT",
    "SERVING_PORT",
    # The model server's API key is a compose secret (a file): airflow-init reads it into the
    # serving_local connection; no Airflow process needs it in its environment.
    "NS_SERVING_API_KEY",
    "NS_SERVING_ADMIN_API_KEY",
}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return compose.load()


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return compose.read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def resolved(raw, example_env) -> dict[str, Any]:
    """The file as Compose sees it with .env.example as .env."""
    return compose.interpolate(raw, example_env)


@pytest.fixture(scope="module")
def services(resolved) -> dict[str, dict[str, Any]]:
    return resolved["services"]


def test_the_stack_has_every_component(services):
    assert set(services) >= EXPECTED_SERVICES, f"missing: {sorted(EXPECTED_SERVICES - set(services))}"


def test_every_service_has_an_image_or_a_build(services):
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"


def test_images_are_pinned_never_latest(services):
    for name, service in services.items():
        image = service.get("image", "")
        if not image:
            continue
        tag = image.rpartition("/")[2].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} has no explicit tag"


def test_emulator_is_the_moto_release_of_requirements(services):
    pin = re.search(r"^moto\[server\]==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.MULTILINE)
    assert services["moto"]["image"] == f"motoserver/moto:{pin[1]}"


def test_long_running_services_have_healthchecks(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", f"{name} runs once; restarting it would loop"
            continue
        check = service.get("healthcheck") or {}
        assert not check.get("disable"), f"{name} disables its healthcheck"
        assert check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must be CMD or CMD-SHELL"


def test_depends_on_names_services_and_waits_for_the_right_state(services):
    for name, service in services.items():
        for dependency, condition in compose.depends_on(service).items():
            assert dependency in services, f"{name} depends on {dependency}, which is not a service"
            assert dependency != name
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully", f"{name} must wait for {dependency} to finish"
            else:
                assert condition == "service_healthy", f"{name} should wait for {dependency} to be healthy"
                assert services[dependency].get("healthcheck"), f"{name} waits for {dependency}'s missing healthcheck"


def test_airflow_components_start_after_init_and_their_backends(services):
    for name in AIRFLOW_SERVICES - ONE_SHOT:
        deps = compose.depends_on(services[name])
        assert deps.get("airflow-init") == "service_completed_successfully", name
        assert {"postgres", "redis"} <= set(deps), f"{name} does not wait for postgres and redis"
    init = compose.depends_on(services["airflow-init"])
    assert init.get("postgres") == "service_healthy"
    assert init.get("moto") == "service_healthy", "airflow-init creates the buckets in the emulator"


def test_celery_executor_on_redis_with_postgres(services):
    for name in AIRFLOW_SERVICES:
        env = compose.environment(services[name])
        assert env.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor", name
        assert re.fullmatch(r"redis://redis:6379/\d+", env.get("AIRFLOW__CELERY__BROKER_URL", "")), name
        assert re.fullmatch(
            r"db\+postgresql://[^@]+@postgres:5432/\w+", env.get("AIRFLOW__CELERY__RESULT_BACKEND", "")
        ), name
        assert re.fullmatch(
            r"postgresql(\+psycopg2)?://[^@]+@postgres:5432/airflow", env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
        ), name
        assert env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL") == "http://airflow-apiserver:8080/execution/", name
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")


def test_airflow_components_share_one_configuration(services):
    """Fernet key, JWT secret, databases: every component must see the same values."""
    reference = compose.environment(services["airflow-scheduler"])
    for name in AIRFLOW_SERVICES:
        env = compose.environment(services[name])
        differing = {key for key, value in reference.items() if env.get(key) != value}
        assert not differing, f"{name} differs from the scheduler in {sorted(differing)}"
        assert services[name].get("image") == services["airflow-scheduler"]["image"], name
        assert services[name]["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name


def test_worker_can_be_scaled(services):
    worker = services["airflow-worker"]
    assert "container_name" not in worker, "a fixed container_name blocks --scale airflow-worker=N"
    assert not worker.get("ports"), "a published port blocks --scale airflow-worker=N"
    assert worker["command"] in ("celery worker", ["celery", "worker"])


def test_init_migrates_and_applies_airflow_settings_yaml(services):
    init = services["airflow-init"]
    command = init["command"] if isinstance(init["command"], str) else "\n".join(init["command"])
    migrate = command.find("airflow db migrate")
    settings = command.find("python -m scripts.airflow_settings")
    assert migrate >= 0, "airflow-init does not migrate the metadata database"
    assert settings > migrate, "airflow-init must apply airflow_settings.yaml after the migration"
    assert "create_buckets" in command, "airflow-init does not create the buckets (scripts.bootstrap)"
    assert (ROOT / "scripts" / "airflow_settings.py").exists()
    assert '__name__ == "__main__"' in (ROOT / "scripts" / "airflow_settings.py").read_text()


def test_tasks_and_include_are_in_the_airflow_image_or_mounted(services):
    copied = {
        source.rstrip("/")
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
        if not source.startswith("--")
    }
    for name in AIRFLOW_SERVICES:
        service = services[name]
        mounts = {str(v).split(":")[0].rstrip("/") for v in service.get("volumes", [])}
        from_image = service.get("build", {}).get("dockerfile") == "Dockerfile"
        for folder in ("tasks", "include", "dags", "plugins"):
            assert (from_image and folder in copied) or f"./{folder}" in mounts, f"{name} has no {folder}/"


def test_init_sql_creates_the_mlflow_and_monitoring_databases(services):
    postgres = services["postgres"]
    mounts = [v for v in postgres["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    assert mounts, "postgres mounts no init script"
    sql = (ROOT / mounts[0].split(":")[0]).read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", sql))
    assert created >= {"mlflow", "monitoring"}
    assert postgres["environment"]["POSTGRES_DB"] == "airflow"
    backend = compose.environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql(\+psycopg2)?://[^@]+@postgres:5432/mlflow", backend)


def test_mlflow_stores_artifacts_in_the_emulator(services):
    mlflow = services["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--artifacts-destination=s3://" in args and "--serve-artifacts" in args
    env = compose.environment(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == "http://moto:5000"
    # The server rejects Host headers it does not know: the service name must be allowed.
    assert re.search(r"--allowed-hosts=\S*\bmlflow:\*", args)


def test_monitoring_store_connection_is_postgres(services):
    env = compose.environment(services["airflow-worker"])
    variable = f"AIRFLOW_CONN_{Settings().monitoring_conn_id.upper()}"
    connection = json.loads(env[variable])
    assert connection["conn_type"] == "postgres"
    assert (connection["host"], connection["port"], connection["schema"]) == ("postgres", 5432, "monitoring")


def test_same_settings_as_the_embedded_stack(services, tmp_path):
    """Every variable the embedded stack sets is set here too, under the same name."""
    embedded = service_model.stack_environment(
        service_model.Paths(tmp_path), service_model.Ports(moto=1, mlflow=2, airflow=3, serving=4)
    )
    airflow_env = compose.environment(services["airflow-worker"])
    missing = set(embedded) - EMBEDDED_ONLY - set(airflow_env)
    assert not missing, f"set by scripts/stack.py but not by docker-compose.yaml: {sorted(missing)}"
    assert airflow_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert airflow_env["AWS_ENDPOINT_URL"] == "http://moto:5000"


def test_ns_variables_are_known_settings(raw, tmp_path):
    """An NS_* name compose sets must be a Settings field or a variable the code reads."""
    known = {ENV_PREFIX + field.upper() for field in Settings.__dataclass_fields__}
    known |= set(service_model.stack_environment(service_model.Paths(tmp_path), service_model.Ports(1, 2, 3, 4)))
    known |= set(re.findall(r'"(NS_[A-Z_]+)"', (ROOT / "tasks" / "config.py").read_text()))
    for name, service in raw["services"].items():
        for key in compose.environment(service):
            if key.startswith(ENV_PREFIX):
                assert key in known, f"{name} sets {key}, which nothing reads (a typo of a Settings field?)"


BIND = "${BIND_ADDRESS:-127.0.0.1}"


def test_host_ports_are_the_embedded_stacks_on_loopback(raw):
    defaults = service_model.Ports.from_env({})
    expected = {
        "moto": ("MOTO_PORT", defaults.moto, 5000),
        "mlflow": ("MLFLOW_PORT", defaults.mlflow, 5000),
        "airflow-apiserver": ("AIRFLOW_PORT", defaults.airflow, 8080),
        "serving": ("SERVING_PORT", defaults.serving, 8000),
    }
    for name, (variable, default, container) in expected.items():
        assert raw["services"][name]["ports"] == [f"{BIND}:${{{variable}:-{default}}}:{container}"], name
    published = {name for name, service in raw["services"].items() if service.get("ports")}
    assert published == set(expected), "a service publishes a port this test does not know"


def test_serving_logs_predictions_where_the_drift_dag_reads_them(services):
    settings_yaml = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())
    variable = next(v for v in settings_yaml["airflow"]["variables"] if v["variable_name"] == SETTINGS_VARIABLE)
    lake_bucket = json.loads(variable["variable_value"])["lake_bucket"]
    env = compose.environment(services["serving"])
    assert env["PREDICTION_LOG_BUCKET"] == lake_bucket
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["API_KEY_FILE"] == "/run/secrets/serving_api_key" and "API_KEY" not in env
    assert services["serving"]["build"] == {"context": ".", "dockerfile": "serving/Dockerfile"}


def _secret_values(raw: dict[str, Any]):
    """(where, name, value) of every environment entry, in services and in x- blocks."""
    blocks = {f"services.{name}": service for name, service in raw["services"].items()}
    blocks.update({key: value for key, value in raw.items() if key.startswith("x-") and isinstance(value, dict)})
    for where, block in blocks.items():
        env = block.get("environment", block) if where.startswith("x-") else block.get("environment", {})
        if isinstance(env, dict | list):
            for name, value in compose.environment({"environment": env}).items():
                yield where, name, value


def test_no_literal_secrets(raw):
    """PASSWORD/SECRET/KEY/TOKEN values, URI passwords and JSON passwords come from .env, with no default."""
    required = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}")
    checked = 0
    for where, name, value in _secret_values(raw):
        if SECRET_NAME.search(name) and not name.endswith("_FILE"):  # *_FILE holds a path to a secret
            assert required.fullmatch(value), f"{where}: {name} must be ${{VAR}} or ${{VAR:?...}}, got {value!r}"
            checked += 1
        for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value) + re.findall(r'"password":\s*"([^"]*)"', value):
            assert required.fullmatch(password), f"{where}: {name} has a literal password"
            checked += 1
    assert checked >= 8  # the check saw the secrets (a refactor moving them must not skip it)


def test_env_example_sets_every_required_variable(raw, example_env):
    required = {m.group("braced") for m in compose.variables(raw) if m.group("op") in (":?", "?")}
    assert required <= set(example_env), f"missing from .env.example: {sorted(required - set(example_env))}"
    compose.interpolate(raw, example_env)  # raises MissingVariable otherwise
    with pytest.raises(compose.MissingVariable):
        compose.interpolate(raw, {})
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env must be git-ignored"


def test_valid_against_the_compose_specification(resolved):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def _compose_clis() -> list[list[str]]:
    clis = []
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            clis.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        clis.append(["docker-compose"])
    return clis


def test_compose_cli_accepts_the_file():
    clis = _compose_clis()
    if not clis:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the schema test still ran")
    for cli in clis:
        done = subprocess.run(
            [*cli, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{' '.join(cli)} config: {done.stderr}"


# --- locked down: loopback ports, no placeholder secret, a clean stop of the model server ---------

_LOOPBACK_PORT = re.compile(r"(127\.0\.0\.1|\$\{BIND_ADDRESS:-127\.0\.0\.1\}):(\$\{[A-Z_]+:-\d+\}|\d+):\d+")


def loopback_violations(raw: dict[str, Any]) -> list[str]:
    """Port bindings that would publish on every interface (no 127.0.0.1 unless BIND_ADDRESS says so)."""
    return [
        f"{name}: {port}"
        for name, service in raw["services"].items()
        for port in service.get("ports", [])
        if not _LOOPBACK_PORT.fullmatch(str(port))
    ]


def test_every_port_is_bound_to_loopback_unless_a_variable_says_otherwise(raw, example_env):
    assert loopback_violations(raw) == []
    resolved = compose.interpolate(raw, example_env)
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} with .env.example"
    opened = compose.interpolate(raw, {**example_env, "BIND_ADDRESS": "0.0.0.0"})
    assert opened["services"]["moto"]["ports"][0].startswith("0.0.0.0:")


@pytest.mark.parametrize("port", ["4566:5000", "0.0.0.0:4566:5000", "${MOTO_PORT:-4566}:5000", "${BIND_ADDRESS}:1:2"])
def test_a_port_without_loopback_is_caught(raw, port):
    broken = {"services": {**raw["services"], "moto": {**raw["services"]["moto"], "ports": [port]}}}
    assert loopback_violations(broken) == [f"moto: {port}"]


def test_every_secret_of_the_file_is_checked_before_anything_starts(raw, services):
    """Every secret compose passes is one the secrets-check refuses as `change-me`, and every service waits for it."""
    check = services["secrets-check"]
    env = compose.environment(raw["services"]["secrets-check"])
    assert set(env) == set(SECRETS), "secrets-check must see exactly the secrets scripts/check_secrets.py checks"
    used = {
        m.group("braced") for m in compose.variables(raw) if m.group("braced") and SECRET_NAME.search(m.group("braced"))
    }
    emulator = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # moto's conventional `testing`, not secrets
    assert used - emulator <= set(SECRETS), "a secret compose uses that nothing checks"
    assert check.get("restart") == "no"

    def waits_for_check(name: str, seen: frozenset = frozenset()) -> bool:
        deps = compose.depends_on(services[name])
        return deps.get("secrets-check") == "service_completed_successfully" or any(
            waits_for_check(dep, seen | {name}) for dep in deps if dep not in seen
        )

    for name in set(services) - {"secrets-check"}:
        assert waits_for_check(name), f"{name} can start before the secrets are checked"


def _check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "scripts.check_secrets"], env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def proper_secrets(tmp_path_factory) -> dict[str, str]:
    from cryptography.fernet import Fernet

    folder = tmp_path_factory.mktemp("secrets")
    values = {name: f"generated-{name.lower()}" for name in SECRETS}
    for name in ("serving_api_key", "serving_admin_api_key"):
        (folder / name).write_text(f"a-real-generated-{name}\n")
        values[f"{name.upper()}_FILE"] = str(folder / name)
    values |= {"AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode()}
    return values


def test_the_check_passes_generated_secrets(proper_secrets):
    done = _check_secrets(proper_secrets)
    assert done.returncode == 0, done.stderr
    assert f"{len(SECRETS)} secrets set" in done.stdout


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_the_stack_refuses_change_me_for_every_secret(proper_secrets, example_env, tmp_path, name):
    """.env.example's placeholder (and an empty value) stops the stack, naming the secret and how to generate it."""
    if name.endswith("_FILE"):
        placeholder = tmp_path / "serving_api_key"
        placeholder.write_text("change-me\n")
        broken = {**proper_secrets, name: str(placeholder)}
    else:
        assert example_env[name] == "change-me", f".env.example should ship {name}=change-me"
        broken = {**proper_secrets, name: example_env[name]}
    done = _check_secrets(broken)
    assert done.returncode == 1
    assert name in done.stderr and "still 'change-me'" in done.stderr
    assert "python -c" in done.stderr  # how to generate one
    empty = _check_secrets({**proper_secrets, name: ""})
    assert empty.returncode == 1 and f"{name} (in .env) is empty" in empty.stderr


def test_a_missing_key_file_and_a_malformed_fernet_key_are_refused(proper_secrets, tmp_path):
    done = _check_secrets({**proper_secrets, "SERVING_API_KEY_FILE": str(tmp_path / "nope")})
    assert done.returncode == 1 and "cannot be read" in done.stderr
    done = _check_secrets({**proper_secrets, "AIRFLOW__CORE__FERNET_KEY": "not-a-key"})
    assert done.returncode == 1 and "is not a Fernet key" in done.stderr


@pytest.mark.parametrize(("secret", "variable"), [("serving_api_key", "API_KEY_FILE"),
                                                  ("serving_admin_api_key", "ADMIN_API_KEY_FILE")])  # fmt: skip
def test_the_serving_keys_come_from_secret_files(raw, secret, variable):
    assert raw["secrets"][secret]["file"].endswith(f"/secrets/{secret}}}")
    for name in ("serving", "secrets-check", "airflow-init"):
        assert secret in raw["services"][name].get("secrets", []), name
    assert compose.environment(raw["services"]["serving"])[variable] == f"/run/secrets/{secret}"
    assert f"/run/secrets/{secret}" in "\n".join(raw["services"]["airflow-init"]["command"])
    assert "secrets/" in (ROOT / ".gitignore").read_text()


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_the_model_server_gets_longer_than_its_flush_timeout_to_stop(raw):
    """Compose SIGKILLs after stop_grace_period (10 s by default): the server's log flush on SIGTERM
    waits up to its close timeout (10 s) for S3, so the grace period must be longer (>= 30 s)."""
    import inspect

    from serving.prediction_log import PredictionLog
    from tasks.local_server import STOP_TIMEOUT_SECONDS

    close_timeout = inspect.signature(PredictionLog.close).parameters["timeout"].default
    grace = _seconds(raw["services"]["serving"]["stop_grace_period"])
    assert grace >= 30 and grace > close_timeout
    assert STOP_TIMEOUT_SECONDS >= 30  # the local model server gets as long (tasks/local_server.py)
