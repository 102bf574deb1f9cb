"""Model-server settings, read once from the environment at start-up.

Every setting has a documented default except the API key: a server that would
answer ``/predict`` for anyone must be asked for explicitly (``ALLOW_NO_API_KEY=true``,
local development only). The S3 endpoint of the prediction log is boto3's own
``AWS_ENDPOINT_URL`` (the moto emulator in embedded mode), not a setting here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Model and dataset names go into URL paths, S3 keys and metric labels: tame characters only.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DATASET_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,99}$")
# Bytes a JSON value may take in a request body (with the whitespace around it): a float in
# full precision is at most 24 characters, an int64 20.
_VALUE_BYTES = 32
_BODY_OVERHEAD_BYTES = 64 * 1024


class ConfigError(ValueError):
    """The serving configuration is invalid; the message names the variable and the fix."""


@dataclass(frozen=True)
class ModelEntry:
    """One model the server serves: the registered model and the dataset spec of its requests."""

    name: str
    dataset: str


@dataclass(frozen=True)
class ServingSettings:
    """Configuration of one model server.

    Attributes:
        tracking_uri: MLflow tracking server (``MLFLOW_TRACKING_URI``, default the embedded
            stack's ``http://127.0.0.1:5050``). The model registry is the same server.
        model_name: Registered model served by default (``MODEL_NAME``, default ``network_security``).
        model_alias: Alias every model follows when no version is pinned (``MODEL_ALIAS``,
            default ``champion``).
        model_version: Pinned version of the default model (``MODEL_VERSION``); when set it
            wins over the alias and alias polling is pointless for that model.
        dataset: Dataset spec of the default model's requests (``DATASET``, default ``network_security``).
        models: Every model served, the default first (``MODELS``: a comma list of ``name`` or
            ``name=dataset``, a bare name using the dataset of the same name; default
            ``MODEL_NAME=DATASET``). More can be added at run time (``PUT /admin/models/{name}``).
        api_key: Shared secret expected in the ``X-API-Key`` header of predictions and model
            information (``API_KEY``, or the content of the file named by ``API_KEY_FILE``, e.g.
            a mounted secret). Never shown by ``repr``.
        admin_api_key: The secret every ``/admin/*`` route expects in ``X-API-Key`` instead
            (``ADMIN_API_KEY`` or ``ADMIN_API_KEY_FILE``); must differ from ``api_key``. Without
            it the admin routes answer 403, unless the server runs without any key
            (``ALLOW_NO_API_KEY=true``, local development).
        allow_no_api_key: Serve without authentication (``ALLOW_NO_API_KEY=true``, local development).
        prediction_log_bucket: Bucket the prediction log is written to (``PREDICTION_LOG_BUCKET``,
            default ``network-security-lake``); empty turns the prediction log off.
        prediction_log_prefix: Key prefix of the prediction log (``PREDICTION_LOG_PREFIX``, default
            ``predictions``); objects go to ``<prefix>/<model_name>/dt=YYYY-MM-DD/HH/``.
        prediction_log_flush_seconds: Longest a logged prediction waits for its object while S3
            keeps up (``PREDICTION_LOG_FLUSH_SECONDS``, default 2.0).
        prediction_log_batch_size: Records that make an object worth writing before the flush
            interval (``PREDICTION_LOG_BATCH_SIZE``, default 500).
        prediction_log_max_buffer: High-water mark: records not yet written to S3 beyond which
            predictions are answered 503 with ``Retry-After`` (nothing accepted is dropped)
            (``PREDICTION_LOG_MAX_BUFFER``, default 100000).
        prediction_log_max_object_records: Most records in one object; a writer that falls
            behind writes objects up to this size (``PREDICTION_LOG_MAX_OBJECT_RECORDS``, default 50000).
        prediction_log_max_in_flight: PUTs at once (``PREDICTION_LOG_MAX_IN_FLIGHT``, default 4).
        prediction_log_spool_dir: Durable spool on local disk (``PREDICTION_LOG_SPOOL_DIR``,
            default empty = off): records are written there before the answer, so a crash
            loses nothing answered 200; the next start uploads what is left. One folder per
            server process.
        prediction_log_spool_max_bytes: Spool size beyond which predictions are answered 503
            with ``Retry-After`` (``PREDICTION_LOG_SPOOL_MAX_BYTES``, default 1 GiB).
        prediction_log_spool_fsync: fsync the spool at every hand-off, to survive a power loss
            too, not only a crash of the process (``PREDICTION_LOG_SPOOL_FSYNC``, default false).
        prediction_log_close_timeout_seconds: How long a shutdown waits for S3 to take what the
            log still holds (``PREDICTION_LOG_CLOSE_TIMEOUT_SECONDS``, default 20; a container's
            stop grace period must exceed it). Without a spool, what is left after it is lost.
        prediction_log_s3_timeout_seconds: Read timeout of one PUT (``PREDICTION_LOG_S3_TIMEOUT_SECONDS``,
            default 10); a timed-out PUT is retried under the same key.
        alias_poll_seconds: How often to check whether the alias moved and reload
            (``ALIAS_POLL_SECONDS``, default 0 = never; ``POST /admin/reload`` reloads on demand).
        max_batch_size: Most records accepted by ``POST /predict/batch`` (``MAX_BATCH_SIZE``, default 1000).
        max_body_bytes: Largest request body accepted, checked on ``Content-Length`` and on the
            bytes received, before anything is parsed; larger is 413 (``MAX_BODY_BYTES``, default
            0 = derived from ``MAX_BATCH_SIZE`` and the widest dataset record).
        max_concurrent_requests: Predictions, model and admin requests in progress at once;
            beyond it 503 with ``Retry-After`` (``MAX_CONCURRENT_REQUESTS``, default 64; the
            probes are never limited).
        micro_batch_window_ms: How long a single-record request waits for concurrent ones to
            share its model call (``MICRO_BATCH_WINDOW_MS``, default 1.0; 0 = only requests
            that arrived during the previous call share one).
        micro_batch_max_records: Most single-record requests scored in one model call
            (``MICRO_BATCH_MAX_RECORDS``, default 64).
        shadow_max_pending_rows: Rows waiting for a shadow candidate at most; beyond it the
            newest rows are not shadowed (counted) rather than delay anything
            (``SHADOW_MAX_PENDING_ROWS``, default 50000).
        fault_injection: Allow a release call to inject errors or latency into its candidate,
            for demos and tests (``FAULT_INJECTION=true``; default off: such a call is refused).
    """

    tracking_uri: str = "http://127.0.0.1:5050"
    model_name: str = "network_security"
    model_alias: str = "champion"
    model_version: str | None = None
    dataset: str = "network_security"
    models: tuple[ModelEntry, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    allow_no_api_key: bool = False
    prediction_log_bucket: str = "network-security-lake"
    prediction_log_prefix: str = "predictions"
    prediction_log_flush_seconds: float = 2.0
    prediction_log_batch_size: int = 500
    prediction_log_max_buffer: int = 100_000
    prediction_log_max_object_records: int = 50_000
    prediction_log_max_in_flight: int = 4
    prediction_log_spool_dir: str = ""
    prediction_log_spool_max_bytes: int = 1 << 30
    prediction_log_spool_fsync: bool = False
    prediction_log_close_timeout_seconds: float = 20.0
    prediction_log_s3_timeout_seconds: float = 10.0
    alias_poll_seconds: float = 0.0
    max_batch_size: int = 1000
    max_body_bytes: int = 0
    max_concurrent_requests: int = 64
    micro_batch_window_ms: float = 1.0
    micro_batch_max_records: int = 64
    shadow_max_pending_rows: int = 50_000
    fault_injection: bool = False

    def __post_init__(self) -> None:
        if not self.api_key and not self.allow_no_api_key:
            raise ConfigError(
                "no API key configured: set API_KEY (or API_KEY_FILE to a file holding it). "
                "To serve without authentication for local development only, set ALLOW_NO_API_KEY=true."
            )
        if self.admin_api_key and self.admin_api_key == self.api_key:
            raise ConfigError(
                "ADMIN_API_KEY equals API_KEY: the admin key must be a separate secret "
                '(generate one, e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
            )
        if self.model_version is not None and not (self.model_version.isdigit() and int(self.model_version) > 0):
            raise ConfigError(f"MODEL_VERSION={self.model_version!r} is not a registered model version (1, 2, ...)")
        if not self.model_name:
            raise ConfigError("MODEL_NAME is empty")
        if self.model_version is None and not self.model_alias:
            raise ConfigError("set MODEL_ALIAS (e.g. champion) or pin MODEL_VERSION")
        if not self.models:
            object.__setattr__(self, "models", (ModelEntry(self.model_name, self.dataset),))
        names = [entry.name for entry in self.models]
        for entry in self.models:
            if not MODEL_NAME_PATTERN.match(entry.name):
                raise ConfigError(f"model name {entry.name!r} in MODELS: use letters, digits, '_', '.', '-'")
            if not DATASET_NAME_PATTERN.match(entry.dataset):
                raise ConfigError(f"dataset {entry.dataset!r} of model {entry.name!r}: not a dataset spec name")
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ConfigError(f"MODELS names {duplicated} more than once")
        positive = {
            "PREDICTION_LOG_FLUSH_SECONDS": self.prediction_log_flush_seconds,
            "PREDICTION_LOG_BATCH_SIZE": self.prediction_log_batch_size,
            "PREDICTION_LOG_MAX_BUFFER": self.prediction_log_max_buffer,
            "PREDICTION_LOG_MAX_OBJECT_RECORDS": self.prediction_log_max_object_records,
            "PREDICTION_LOG_MAX_IN_FLIGHT": self.prediction_log_max_in_flight,
            "PREDICTION_LOG_SPOOL_MAX_BYTES": self.prediction_log_spool_max_bytes,
            "PREDICTION_LOG_CLOSE_TIMEOUT_SECONDS": self.prediction_log_close_timeout_seconds,
            "PREDICTION_LOG_S3_TIMEOUT_SECONDS": self.prediction_log_s3_timeout_seconds,
            "MAX_BATCH_SIZE": self.max_batch_size,
            "MAX_CONCURRENT_REQUESTS": self.max_concurrent_requests,
            "MICRO_BATCH_MAX_RECORDS": self.micro_batch_max_records,
            "SHADOW_MAX_PENDING_ROWS": self.shadow_max_pending_rows,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.max_body_bytes < 0:
            raise ConfigError(f"MAX_BODY_BYTES must be 0 (derived) or positive, got {self.max_body_bytes}")
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

    @property
    def default_model(self) -> str:
        """The model of ``/predict``, ``/predict/batch`` and ``/model``: the first of ``models``."""
        return self.models[0].name

    def body_limit(self, feature_names: Sequence[Sequence[str]]) -> int:
        """``max_body_bytes``, or when 0 the size of a batch of ``max_batch_size`` of the widest records.

        Args:
            feature_names: The feature names of each served dataset.
        """
        if self.max_body_bytes:
            return self.max_body_bytes
        widest = max((sum(len(name) + _VALUE_BYTES for name in names) for names in feature_names), default=0)
        return _BODY_OVERHEAD_BYTES + self.max_batch_size * widest

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """Build the settings from environment variables (unset ones take the defaults).

        Args:
            environ: Variables to read (default ``os.environ``).

        Returns:
            The validated settings.

        Raises:
            ConfigError: A value is malformed, the API key is missing or ambiguous, or a key
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
            "api_key": _secret(env, "API_KEY"),
            "admin_api_key": _secret(env, "ADMIN_API_KEY"),
            "allow_no_api_key": _boolean(env, "ALLOW_NO_API_KEY", False),
            "prediction_log_bucket": env.get("PREDICTION_LOG_BUCKET", defaults["prediction_log_bucket"].default),
            "prediction_log_prefix": env.get("PREDICTION_LOG_PREFIX", defaults["prediction_log_prefix"].default),
            "prediction_log_spool_dir": env.get("PREDICTION_LOG_SPOOL_DIR", "").strip(),
            "prediction_log_spool_fsync": _boolean(env, "PREDICTION_LOG_SPOOL_FSYNC", False),
            "fault_injection": _boolean(env, "FAULT_INJECTION", False),
        }
        if env.get("MODELS", "").strip():
            values["models"] = _models(env["MODELS"])
            values["model_name"] = values["models"][0].name  # type: ignore[index]
            values["dataset"] = values["models"][0].dataset  # type: ignore[index]
        numbers = {
            "prediction_log_flush_seconds": ("PREDICTION_LOG_FLUSH_SECONDS", float),
            "prediction_log_batch_size": ("PREDICTION_LOG_BATCH_SIZE", int),
            "prediction_log_max_buffer": ("PREDICTION_LOG_MAX_BUFFER", int),
            "prediction_log_max_object_records": ("PREDICTION_LOG_MAX_OBJECT_RECORDS", int),
            "prediction_log_max_in_flight": ("PREDICTION_LOG_MAX_IN_FLIGHT", int),
            "prediction_log_spool_max_bytes": ("PREDICTION_LOG_SPOOL_MAX_BYTES", int),
            "prediction_log_close_timeout_seconds": ("PREDICTION_LOG_CLOSE_TIMEOUT_SECONDS", float),
            "prediction_log_s3_timeout_seconds": ("PREDICTION_LOG_S3_TIMEOUT_SECONDS", float),
            "alias_poll_seconds": ("ALIAS_POLL_SECONDS", float),
            "max_batch_size": ("MAX_BATCH_SIZE", int),
            "max_body_bytes": ("MAX_BODY_BYTES", int),
            "max_concurrent_requests": ("MAX_CONCURRENT_REQUESTS", int),
            "micro_batch_window_ms": ("MICRO_BATCH_WINDOW_MS", float),
            "micro_batch_max_records": ("MICRO_BATCH_MAX_RECORDS", int),
            "shadow_max_pending_rows": ("SHADOW_MAX_PENDING_ROWS", int),
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


def _models(raw: str) -> tuple[ModelEntry, ...]:
    entries = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, _, dataset = item.partition("=")
        entries.append(ModelEntry(name.strip(), dataset.strip() or name.strip()))
    if not entries:
        raise ConfigError(f"MODELS={raw!r} names no model; use e.g. network_security,intrusion_flows=intrusion_flows")
    return tuple(entries)


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false")


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """``NAME``, or the content of the file ``NAME_FILE`` names (never both)."""
    inline, path = env.get(name) or None, env.get(f"{name}_FILE") or None
    if inline and path:
        # Two sources could silently disagree after a secret rotation: make the operator pick one.
        raise ConfigError(f"both {name} and {name}_FILE are set; set only one")
    if not path:
        return inline
    try:
        key = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"{name}_FILE={path!r} cannot be read ({err.strerror or err})") from err
    if not key:
        raise ConfigError(f"{name}_FILE={path!r} is empty")
    return key
