"""docker-compose.yaml and the distributed mode held against the one service model (scripts/services.py).

The same services (compose's, the model's ``COMPOSE_SERVICES``, and the distributed mode's
processes), the same Airflow commands, the same MLflow flags and the same shared Airflow
settings (``AIRFLOW_SETTINGS``: default_deferrable, the heartbeat and visibility timeouts, ...).
``differences`` is the check; the parametrized tests below break each service and each setting
once, on either side, and show that the check catches it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import pytest

from scripts import services
from scripts.distributed import config as distributed_config
from scripts.distributed import stack as distributed_stack
from tests.infra import compose

# Airflow settings compose sets that differ by mode by nature (addresses, credentials, sizing):
# everything else compose gives every Airflow component must be a shared setting of the model.
MODE_SPECIFIC = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
}
ONE_SHOT = {"bootstrap", "secrets-check"}
EXTERNAL = set(services.BACKENDS)


@dataclass(frozen=True)
class Model:
    compose_services: dict[str, str]
    airflow_settings: dict[str, str]
    components: dict[str, tuple[str, ...]]
    mlflow_flags: tuple[str, ...]


MODEL = Model(
    dict(services.COMPOSE_SERVICES),
    dict(services.AIRFLOW_SETTINGS),
    dict(services.AIRFLOW_COMPONENTS),
    services.MLFLOW_FLAGS,
)


def _flags(command: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in command if arg.startswith("--")}


def differences(raw: dict[str, Any], model: Model, env: dict[str, str]) -> list[str]:
    """Where docker-compose.yaml (``raw``, interpolated from ``env``) and the service model disagree."""
    found = []
    resolved = compose.interpolate(raw, env)["services"]
    declared = set(model.compose_services.values())
    found += [f"compose service {name!r} is not in the service model" for name in sorted(set(resolved) - declared)]
    found += [f"service model's {name!r} is not in compose" for name in sorted(declared - set(resolved))]
    by_compose = {compose_name: name for name, compose_name in model.compose_services.items()}
    airflow = [name for name in resolved if by_compose.get(name) in model.components]
    for name in airflow:
        component = model.components[by_compose[name]]
        command = resolved[name]["command"]
        if (command if isinstance(command, str) else " ".join(command)) != " ".join(component):
            found.append(f"{name} runs {command!r}, the model `airflow {' '.join(component)}`")
        shared = compose.environment(resolved[name])
        for setting, value in model.airflow_settings.items():
            if setting not in shared:
                found.append(f"{name} does not set {setting} (the model: {value})")
            elif shared[setting] != value:
                found.append(f"{name} sets {setting}={shared[setting]!r}, the model {value!r}")
        unknown = {k for k in shared if k.startswith("AIRFLOW__")} - set(model.airflow_settings) - MODE_SPECIFIC
        found += [f"{name} sets {setting}, which the service model does not share" for setting in sorted(unknown)]
    if "mlflow" in resolved and model.compose_services.get("mlflow") == "mlflow":
        flags = _flags(resolved["mlflow"]["command"])
        if flags != set(model.mlflow_flags):
            found.append(f"mlflow's flags {sorted(flags)} are not the model's {sorted(model.mlflow_flags)}")
    return found


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return compose.load()


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return compose.read_env_file()


def test_compose_is_the_service_model(raw, env):
    assert differences(raw, MODEL, env) == []


def test_the_models_mlflow_command_is_what_it_declares():
    command = services.mlflow_command("127.0.0.1", 5050, "file:///tmp/a", ["127.0.0.1"])
    assert command[0] == "server" and _flags(command) == set(services.MLFLOW_FLAGS)


def _without_service(raw: dict[str, Any], name: str) -> dict[str, Any]:
    broken = copy.deepcopy(raw)
    del broken["services"][name]
    for service in broken["services"].values():  # nothing may depend on a service that is gone
        if isinstance(service.get("depends_on"), dict):
            service["depends_on"].pop(name, None)
    return broken


@pytest.mark.parametrize("name", sorted(services.COMPOSE_SERVICES))
def test_a_service_removed_from_compose_is_caught(raw, env, name):
    found = differences(_without_service(raw, services.COMPOSE_SERVICES[name]), MODEL, env)
    assert f"service model's {services.COMPOSE_SERVICES[name]!r} is not in compose" in found


@pytest.mark.parametrize("name", sorted(services.COMPOSE_SERVICES))
def test_a_service_removed_from_the_model_is_caught(raw, env, name):
    model = replace(MODEL, compose_services={k: v for k, v in MODEL.compose_services.items() if k != name})
    found = differences(raw, model, env)
    assert f"compose service {services.COMPOSE_SERVICES[name]!r} is not in the service model" in found


@pytest.mark.parametrize("setting", sorted(services.AIRFLOW_SETTINGS))
def test_a_setting_removed_from_compose_is_caught(raw, env, setting):
    broken = copy.deepcopy(raw)
    del broken["x-airflow-common"]["environment"][setting]
    for service in broken["services"].values():  # the anchors were merged when the file was read
        environment = service.get("environment")
        if isinstance(environment, dict):
            environment.pop(setting, None)
    found = differences(broken, MODEL, env)
    assert any(f"does not set {setting}" in line for line in found), found


@pytest.mark.parametrize("setting", sorted(services.AIRFLOW_SETTINGS))
def test_a_setting_removed_from_the_model_is_caught(raw, env, setting):
    model = replace(MODEL, airflow_settings={k: v for k, v in MODEL.airflow_settings.items() if k != setting})
    found = differences(raw, model, env)
    assert any(f"sets {setting}, which the service model does not share" in line for line in found), found


@pytest.mark.parametrize("setting", sorted(services.AIRFLOW_SETTINGS))
def test_a_setting_that_differs_is_caught(raw, env, setting):
    model = replace(MODEL, airflow_settings={**MODEL.airflow_settings, setting: "something else"})
    assert any(f"{setting}=" in line and "the model 'something else'" in line for line in differences(raw, model, env))


def test_a_changed_command_and_a_dropped_mlflow_flag_are_caught(raw, env):
    broken = copy.deepcopy(raw)
    broken["services"]["airflow-triggerer"]["command"] = "scheduler"
    broken["services"]["mlflow"]["command"] = [a for a in broken["services"]["mlflow"]["command"] if "allowed" not in a]
    found = differences(broken, MODEL, env)
    assert "airflow-triggerer runs 'scheduler', the model `airflow triggerer`" in found
    assert any(line.startswith("mlflow's flags") for line in found)


# --- the distributed mode runs the same model ------------------------------------------------------


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> tuple[Any, dict[str, str], list[Any]]:
    state = tmp_path_factory.mktemp("dist")
    config = distributed_config.Config.from_env({"NS_DIST_STATE_DIR": str(state)})
    environment = distributed_config.environment(config)
    return config, environment, distributed_stack.service_list(config)


def _kind(service_name: str) -> str:
    return "worker" if service_name.startswith("worker-") else service_name


def test_the_distributed_mode_runs_every_service_of_the_model(distributed):
    _, _, processes = distributed
    kinds = {_kind(p.name) for p in processes}
    assert kinds == set(services.COMPOSE_SERVICES) - ONE_SHOT - EXTERNAL
    for process in processes:
        assert process.health_path or process.health_check, f"{process.name} has no health check"
        if _kind(process.name) in services.AIRFLOW_COMPONENTS:
            args = services.AIRFLOW_COMPONENTS[_kind(process.name)]
            assert tuple(process.command[1 : 1 + len(args)]) == args, process.name


def test_the_distributed_mode_sets_every_shared_airflow_setting(distributed):
    config, environment, _ = distributed
    for setting, value in services.AIRFLOW_SETTINGS.items():
        assert environment.get(setting) == value, setting
    assert config.heartbeat_timeout == int(
        services.AIRFLOW_SETTINGS["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]
    )
