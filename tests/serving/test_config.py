"""Serving settings from the environment, and the command line."""

from __future__ import annotations

from typing import Any

import pytest

from serving import __main__ as cli
from serving.app import create_app
from serving.config import ConfigError, ModelEntry, ServingSettings


def test_defaults_are_the_documented_ones():
    settings = ServingSettings.from_env({"API_KEY": "k"})

    assert settings == ServingSettings(
        tracking_uri="http://127.0.0.1:5050",
        model_name="network_security",
        model_alias="champion",
        model_version=None,
        dataset="network_security",
        api_key="k",
        prediction_log_bucket="network-security-lake",
        prediction_log_prefix="predictions",
        prediction_log_flush_seconds=2.0,
        prediction_log_batch_size=500,
        prediction_log_max_buffer=100_000,
        alias_poll_seconds=0.0,
        max_batch_size=1000,
    )
    assert settings.auth_required and settings.prediction_log_enabled
    assert settings.models == (ModelEntry("network_security", "network_security"),)
    assert (settings.admin_api_key, settings.prediction_log_spool_dir, settings.fault_injection) == (None, "", False)
    assert (settings.prediction_log_close_timeout_seconds, settings.max_concurrent_requests) == (20.0, 64)


def test_every_variable_is_read():
    settings = ServingSettings.from_env(
        {
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "MODEL_NAME": "intrusion_flows",
            "MODEL_ALIAS": "challenger",
            "MODEL_VERSION": "3",
            "DATASET": "intrusion_flows",
            "API_KEY": "k",
            "PREDICTION_LOG_BUCKET": "lake",
            "PREDICTION_LOG_PREFIX": "served",
            "PREDICTION_LOG_FLUSH_SECONDS": "0.5",
            "PREDICTION_LOG_BATCH_SIZE": "10",
            "PREDICTION_LOG_MAX_BUFFER": "20",
            "ALIAS_POLL_SECONDS": "30",
            "MAX_BATCH_SIZE": "5",
        }
    )

    assert (settings.tracking_uri, settings.model_name, settings.model_alias) == (
        "http://mlflow:5000",
        "intrusion_flows",
        "challenger",
    )
    assert (settings.model_version, settings.dataset) == ("3", "intrusion_flows")
    assert (settings.prediction_log_bucket, settings.prediction_log_prefix) == ("lake", "served")
    assert (settings.prediction_log_flush_seconds, settings.prediction_log_batch_size) == (0.5, 10)
    assert (settings.prediction_log_max_buffer, settings.alias_poll_seconds, settings.max_batch_size) == (20, 30.0, 5)


def test_the_settings_of_the_edge_the_log_and_the_models_are_read(tmp_path):
    admin = tmp_path / "admin_key"
    admin.write_text("admin-secret\n")
    settings = ServingSettings.from_env(
        {
            "API_KEY": "k",
            "ADMIN_API_KEY_FILE": str(admin),
            "MODELS": "network_security, intrusion_flows=intrusion_flows ,flows_v2=intrusion_flows",
            "MAX_BODY_BYTES": "4096",
            "MAX_CONCURRENT_REQUESTS": "8",
            "PREDICTION_LOG_MAX_OBJECT_RECORDS": "1000",
            "PREDICTION_LOG_MAX_IN_FLIGHT": "2",
            "PREDICTION_LOG_SPOOL_DIR": "/var/spool/serving",
            "PREDICTION_LOG_SPOOL_MAX_BYTES": "1000000",
            "PREDICTION_LOG_SPOOL_FSYNC": "true",
            "PREDICTION_LOG_CLOSE_TIMEOUT_SECONDS": "5",
            "PREDICTION_LOG_S3_TIMEOUT_SECONDS": "2",
            "SHADOW_MAX_PENDING_ROWS": "10",
            "FAULT_INJECTION": "true",
        }
    )

    assert settings.admin_api_key == "admin-secret"
    assert settings.models == (
        ModelEntry("network_security", "network_security"),
        ModelEntry("intrusion_flows", "intrusion_flows"),
        ModelEntry("flows_v2", "intrusion_flows"),
    )
    assert (settings.default_model, settings.model_name) == ("network_security", "network_security")
    assert (settings.max_body_bytes, settings.body_limit([["x"]]), settings.max_concurrent_requests) == (4096, 4096, 8)
    assert (settings.prediction_log_max_object_records, settings.prediction_log_max_in_flight) == (1000, 2)
    assert (settings.prediction_log_spool_dir, settings.prediction_log_spool_max_bytes) == (
        "/var/spool/serving",
        1000000,
    )
    assert settings.prediction_log_spool_fsync and settings.fault_injection
    assert (settings.prediction_log_close_timeout_seconds, settings.prediction_log_s3_timeout_seconds) == (5.0, 2.0)
    assert settings.shadow_max_pending_rows == 10


def test_the_body_limit_is_derived_from_the_batch_size_and_the_widest_record():
    settings = ServingSettings(api_key="k", max_batch_size=100)
    narrow, wide = settings.body_limit([["a"]]), settings.body_limit([["a"], ["a_long_feature", "b"]])
    assert narrow < wide
    assert wide - settings.body_limit([]) == 100 * (len("a_long_feature") + len("b") + 2 * 32)


def test_without_an_api_key_the_server_refuses_to_start(monkeypatch: pytest.MonkeyPatch):
    for name in ("API_KEY", "API_KEY_FILE", "ALLOW_NO_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(ConfigError, match="no API key configured: set API_KEY .* ALLOW_NO_API_KEY=true"):
        ServingSettings.from_env({})
    with pytest.raises(ConfigError, match="no API key configured"):
        create_app()


def test_no_api_key_is_allowed_only_when_asked_for():
    settings = ServingSettings.from_env({"ALLOW_NO_API_KEY": "true"})
    assert not settings.auth_required


def test_the_key_can_come_from_a_secret_file(tmp_path):
    secret = tmp_path / "api_key"
    secret.write_text("s3cret\n")
    assert ServingSettings.from_env({"API_KEY_FILE": str(secret)}).api_key == "s3cret"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"API_KEY_FILE": "/no/such/secret"}, "API_KEY_FILE='/no/such/secret' cannot be read"),
        ({"API_KEY_FILE": "{empty}"}, "is empty"),
        ({"API_KEY": "a", "API_KEY_FILE": "{empty}"}, "both API_KEY and API_KEY_FILE are set"),
        ({"API_KEY": "k", "MAX_BATCH_SIZE": "lots"}, "MAX_BATCH_SIZE='lots' is not a valid int"),
        ({"API_KEY": "k", "PREDICTION_LOG_BATCH_SIZE": "0"}, "PREDICTION_LOG_BATCH_SIZE must be positive"),
        ({"API_KEY": "k", "ALIAS_POLL_SECONDS": "-1"}, "ALIAS_POLL_SECONDS must be 0"),
        ({"API_KEY": "k", "MODEL_VERSION": "latest"}, "MODEL_VERSION='latest' is not a registered model version"),
        ({"API_KEY": "k", "ALLOW_NO_API_KEY": "maybe"}, "ALLOW_NO_API_KEY='maybe' is not a boolean"),
        ({"API_KEY": "k", "ADMIN_API_KEY": "k"}, "ADMIN_API_KEY equals API_KEY"),
        ({"API_KEY": "k", "ADMIN_API_KEY": "a", "ADMIN_API_KEY_FILE": "{empty}"}, "both ADMIN_API_KEY and ADMIN_API"),
        ({"API_KEY": "k", "MODELS": "a,a"}, r"MODELS names \['a'\] more than once"),
        ({"API_KEY": "k", "MODELS": "../etc"}, "model name '../etc' in MODELS"),
        ({"API_KEY": "k", "MODELS": "m=../../etc/passwd"}, "not a dataset spec name"),
        ({"API_KEY": "k", "MODELS": " , "}, "names no model"),
        ({"API_KEY": "k", "MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES must be 0"),
        ({"API_KEY": "k", "PREDICTION_LOG_MAX_IN_FLIGHT": "0"}, "PREDICTION_LOG_MAX_IN_FLIGHT must be positive"),
    ],
)
def test_invalid_settings_name_the_variable(tmp_path, environ: dict[str, str], message: str):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    environ = {k: v.replace("{empty}", str(empty)) for k, v in environ.items()}
    with pytest.raises(ConfigError, match=message):
        ServingSettings.from_env(environ)


def test_the_key_never_shows_in_repr():
    assert "s3cret" not in repr(ServingSettings(api_key="s3cret"))


def test_command_line_runs_uvicorn_with_the_factory(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(cli.uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))

    cli.main(["--host", "0.0.0.0", "--port", "8123"])

    ((target,), options) = calls[0]
    log_config = options.pop("log_config")
    assert (target, options) == (
        "serving.app:create_app",
        {"factory": True, "host": "0.0.0.0", "port": 8123, "log_level": "info"},
    )
    assert log_config["loggers"]["serving"] == {"handlers": ["default"], "level": "INFO", "propagate": False}
