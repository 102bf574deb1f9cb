"""Model-server settings, read once from the environment at start-up.

Every setting has a documented default except the API key: a server that would
answer ``/predict`` for anyone must be asked for explicitly (``ALLOW_NO_API_KEY=true``,
local development only). The S3 endpoint of the prediction log is boto3's own
``AWS_ENDPOINT_URL`` (the moto emulator in embedded mode), not a setting here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """The serving configuration is invalid; the message names the variable and the fix."""


@dataclass(frozen=True)
class ServingSettings:
    """Configuration of one model server.

    Attributes:
        tracking_uri: MLflow tracking server (``MLFLOW_TRACKING_URI``, default the embedded
            stack's ``http://127.0.0.1:5050``). The model registry is the same server.
        model_name: Registered model to serve (``MODEL_NAME``, default ``network_security``).
        model_alias: Alias followed when no version is pinned (``MODEL_ALIAS``, default ``champion``).
        model_version: Pinned version (``MODEL_VERSION``); when set it wins over the alias and
            alias polling is pointless.
        dataset: Dataset spec the request schema is built from (``DATASET``, default ``network_security``).
        api_key: Shared secret expected in the ``X-API-Key`` header (``API_KEY``, or the content of
            the file named by ``API_KEY_FILE``, e.g. a mounted secret). Never shown by ``repr``.
        allow_no_api_key: Serve without authentication (``ALLOW_NO_API_KEY=true``, local development).
        prediction_log_bucket: Bucket the prediction log is written to (``PREDICTION_LOG_BUCKET``,
            default ``network-security-lake``); empty turns the prediction log off.
        prediction_log_prefix: Key prefix of the prediction log (``PREDICTION_LOG_PREFIX``, default ``predictions``).
        prediction_log_flush_seconds: Longest a logged prediction waits before being written
            (``PREDICTION_LOG_FLUSH_SECONDS``, default 2.0).
        prediction_log_batch_size: Records per written object at most; a full batch is written
            at once (``PREDICTION_LOG_BATCH_SIZE``, default 500).
        prediction_log_max_buffer: Records kept in memory while S3 is unavailable; beyond it the
            oldest are dropped and counted (``PREDICTION_LOG_MAX_BUFFER``, default 100000).
        alias_poll_seconds: How often to check whether the alias moved and reload
            (``ALIAS_POLL_SECONDS``, default 0 = never; ``POST /admin/reload`` reloads on demand).
        max_batch_size: Most records accepted by ``POST /predict/batch`` (``MAX_BATCH_SIZE``, default 1000).
        micro_batch_window_ms: How long a single-record request waits for concurrent ones to
            share its model call (``MICRO_BATCH_WINDOW_MS``, default 1.0; 0 = only requests
            that arrived during the previous call share one).
        micro_batch_max_records: Most single-record requests scored in one model call
            (``MICRO_BATCH_MAX_RECORDS``, default 64).
    """

    tracking_uri: str = "http://127.0.0.1:5050"
    model_name: str = "network_security"
    model_alias: str = "champion"
    model_version: str | None = None
    dataset: str = "network_security"
    api_key: str | None = field(default=None, repr=False)
    allow_no_api_key: bool = False
    prediction_log_bucket: str = "network-security-lake"
    prediction_log_prefix: str = "predictions"
    prediction_log_flush_seconds: float = 2.0
    prediction_log_batch_size: int = 500
    prediction_log_max_buffer: int = 100_000
    alias_poll_seconds: float = 0.0
    max_batch_size: int = 1000
    micro_batch_window_ms: float = 1.0
    micro_batch_max_records: int = 64

    def __post_init__(self) -> None:
        if not self.api_key and not self.allow_no_api_key:
            raise ConfigError(
                "no API key configured: set API_KEY (or API_KEY_FILE to a file holding it). "
                "To serve without authentication for local development only, set ALLOW_NO_API_KEY=true."
            )
        if self.model_version is not None and not (self.model_version.isdigit() and int(self.model_version) > 0):
            raise ConfigError(f"MODEL_VERSION={self.model_version!r} is not a registered model version (1, 2, ...)")
        if not self.model_name:
            raise ConfigError("MODEL_NAME is empty")
        if self.model_version is None and not self.model_alias:
            raise ConfigError("set MODEL_ALIAS (e.g. champion) or pin MODEL_VERSION")
        positive = {
            "PREDICTION_LOG_FLUSH_SECONDS": self.prediction_log_flush_seconds,
            "PREDICTION_LOG_BATCH_SIZE": self.prediction_log_batch_size,
            "PREDICTION_LOG_MAX_BUFFER": self.prediction_log_max_buffer,
            "MAX_BATCH_SIZE": self.max_batch_size,
            "MICRO_BATCH_MAX_RECORDS": self.micro_batch_max_records,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.alias_poll_seconds < 0:
            raise ConfigError(f"ALIAS_POLL_SECONDS must be 0 (off) or positive, got {self.alias_poll_seconds}")
        if not 0 <= self.micro_batch_window_ms <= 1000:
            raise ConfigError(f"MICRO_BATCH_WINDOW_MS must be between 0 and 1000, got {self.micro_batch_window_ms}")

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key)

    @property
    def prediction_log_enabled(self) -> bool:
        return bool(self.prediction_log_bucket)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """Build the settings from environment variables (unset ones take the defaults).

        Args:
            environ: Variables to read (default ``os.environ``).

        Returns:
            The validated settings.

        Raises:
            ConfigError: A value is malformed, the API key is missing or ambiguous, or the key
                file cannot be read; the message names the variable.
        """
        env = os.environ if environ is None else environ
        defaults = cls.__dataclass_fields__
        values: dict[str, object] = {
            "tracking_uri": env.get("MLFLOW_TRACKING_URI") or defaults["tracking_uri"].default,
            "model_name": env.get("MODEL_NAME", defaults["model_name"].default),
            "model_alias": env.get("MODEL_ALIAS", defaults["model_alias"].default),
            "model_version": env.get("MODEL_VERSION") or None,
            "dataset": env.get("DATASET", defaults["dataset"].default),
            "api_key": _api_key(env),
            "allow_no_api_key": _boolean(env, "ALLOW_NO_API_KEY", False),
            "prediction_log_bucket": env.get("PREDICTION_LOG_BUCKET", defaults["prediction_log_bucket"].default),
            "prediction_log_prefix": env.get("PREDICTION_LOG_PREFIX", defaults["prediction_log_prefix"].default),
        }
        numbers = {
            "prediction_log_flush_seconds": ("PREDICTION_LOG_FLUSH_SECONDS", float),
            "prediction_log_batch_size": ("PREDICTION_LOG_BATCH_SIZE", int),
            "prediction_log_max_buffer": ("PREDICTION_LOG_MAX_BUFFER", int),
            "alias_poll_seconds": ("ALIAS_POLL_SECONDS", float),
            "max_batch_size": ("MAX_BATCH_SIZE", int),
            "micro_batch_window_ms": ("MICRO_BATCH_WINDOW_MS", float),
            "micro_batch_max_records": ("MICRO_BATCH_MAX_RECORDS", int),
        }
        for attribute, (variable, kind) in numbers.items():
            raw = env.get(variable)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[attribute] = kind(raw)
            except ValueError as err:
                raise ConfigError(f"{variable}={raw!r} is not a valid {kind.__name__}") from err
        return cls(**values)


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false")


def _api_key(env: Mapping[str, str]) -> str | None:
    inline, path = env.get("API_KEY") or None, env.get("API_KEY_FILE") or None
    if inline and path:
        # Two sources could silently disagree after a secret rotation: make the operator pick one.
        raise ConfigError("both API_KEY and API_KEY_FILE are set; set only one")
    if not path:
        return inline
    try:
        key = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"API_KEY_FILE={path!r} cannot be read ({err.strerror or err})") from err
    if not key:
        raise ConfigError(f"API_KEY_FILE={path!r} is empty")
    return key
