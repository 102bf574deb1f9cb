"""Settings: documented defaults, Variable overrides, then NS_* environment overrides."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tasks.config import Settings, dag_schedule, task_retry_delay

DEFAULTS = {
    "dataset": "network_security",
    "raw_bucket": "network-security-raw",
    "lake_bucket": "network-security-lake",
    "aws_conn_id": "aws_default",
    "split_seed": 42,
    "test_size": 0.2,
    "mlflow_tracking_uri": "http://127.0.0.1:5050",
    "mlflow_experiment": "network_security_training",
    "model_name": "",
    "monitoring_conn_id": "monitoring_store",
    "deploy_targets": "local,ec2",
    "serving_conn_id": "serving_local",
}


def test_defaults() -> None:
    settings = Settings.load(environ={})
    assert dataclasses.asdict(settings) == DEFAULTS
    assert settings == Settings()


@pytest.mark.parametrize("overrides", [None, {}, "", "   "])
def test_empty_overrides_give_defaults(overrides: object) -> None:
    assert Settings.load(overrides, environ={}) == Settings()


def test_json_string_overrides() -> None:
    settings = Settings.load(json.dumps({"lake_bucket": "lake-b", "split_seed": 7, "test_size": 0.3}), environ={})
    assert (settings.lake_bucket, settings.split_seed, settings.test_size) == ("lake-b", 7, 0.3)
    assert settings.raw_bucket == DEFAULTS["raw_bucket"]


def test_mapping_overrides() -> None:
    settings = Settings.load({"dataset": "intrusion_flows", "raw_bucket": "raw-b"}, environ={})
    assert (settings.dataset, settings.raw_bucket) == ("intrusion_flows", "raw-b")
    assert settings.lake_bucket == DEFAULTS["lake_bucket"]


def test_environment_wins_over_mapping() -> None:
    environ = {"NS_LAKE_BUCKET": "env-lake", "NS_SPLIT_SEED": "9", "NS_TEST_SIZE": "0.25", "OTHER": "x"}
    settings = Settings.load({"lake_bucket": "var-lake", "split_seed": 1, "raw_bucket": "var-raw"}, environ=environ)
    assert settings.lake_bucket == "env-lake"
    # Environment strings are converted to the field's type.
    assert settings.split_seed == 9 and isinstance(settings.split_seed, int)
    assert settings.test_size == 0.25 and isinstance(settings.test_size, float)
    assert settings.raw_bucket == "var-raw"


def test_process_environment_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NS_DATASET", "intrusion_flows")
    assert Settings.load().dataset == "intrusion_flows"
    assert Settings.load(environ={}).dataset == DEFAULTS["dataset"]


def test_unknown_key_rejected_naming_it() -> None:
    with pytest.raises(ValueError, match="'lake_bukket'"):
        Settings.load({"lake_bukket": "x"}, environ={})


@pytest.mark.parametrize(
    ("overrides", "environ", "key"),
    [
        ({"split_seed": "abc"}, {}, "split_seed"),
        ('{"test_size": "most"}', {}, "test_size"),
        ({}, {"NS_SPLIT_SEED": "forty-two"}, "split_seed"),
        ({"split_seed": None}, {}, "split_seed"),
    ],
)
def test_wrong_type_rejected_naming_it(overrides: object, environ: dict[str, str], key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        Settings.load(overrides, environ=environ)


def test_invalid_json_rejected() -> None:
    with pytest.raises(ValueError):
        Settings.load("{not json", environ={})


def test_fractional_seed_rejected() -> None:
    with pytest.raises(ValueError, match="split_seed"):
        Settings.load({"split_seed": 1.5}, environ={})


def test_non_object_json_rejected() -> None:
    with pytest.raises(ValueError):
        Settings.load("[1]", environ={})


def test_settings_are_frozen_and_replace_returns_a_copy() -> None:
    settings = Settings()
    changed = settings.replace(split_seed=3)
    assert (settings.split_seed, changed.split_seed) == (42, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.split_seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(("environ", "expected"), [({}, 120), ({"NS_RETRY_DELAY_SECONDS": "5"}, 5)])
def test_task_retry_delay(environ: dict[str, str], expected: int) -> None:
    assert task_retry_delay(environ) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "@hourly"),
        ({"NS_SCHEDULE_NETWORK_SECURITY_DRIFT": "*/15 * * * *"}, "*/15 * * * *"),
        ({"NS_SCHEDULE_NETWORK_SECURITY_DRIFT": "@daily"}, "@daily"),
        ({"NS_SCHEDULE_NETWORK_SECURITY_DRIFT": "none"}, None),
        ({"NS_SCHEDULE_NETWORK_SECURITY_TRAINING": "@weekly"}, "@hourly"),
    ],
)
def test_dag_schedule(environ: dict[str, str], expected: str | None) -> None:
    assert dag_schedule("network_security_drift", "@hourly", environ) == expected


def test_state_dir_has_one_default_whatever_the_working_directory(tmp_path, monkeypatch) -> None:
    from tasks.config import state_dir
    from tasks.dataset_spec import PROJECT_ROOT

    monkeypatch.chdir(tmp_path)
    assert state_dir({}) == PROJECT_ROOT / ".state"
    assert state_dir({"NS_STATE_DIR": str(tmp_path / "s")}) == tmp_path / "s"


def test_each_dataset_has_its_training_dag_and_pool():
    from tasks.config import training_dag_id, training_pool

    assert training_dag_id("network_security") == "network_security_training"  # the historical id stays
    assert training_dag_id("intrusion_flows") == "intrusion_flows_training"
    assert training_pool("intrusion_flows") == "training_intrusion_flows" != training_pool("network_security")


def test_a_model_name_setting_renames_the_settings_datasets_model_only():
    from tasks.config import model_name_for

    assert model_name_for(Settings(), "intrusion_flows") == "intrusion_flows"
    assert model_name_for(Settings(model_name="ns_x"), "network_security") == "ns_x"
    assert model_name_for(Settings(model_name="ns_x"), "intrusion_flows") == "intrusion_flows"
