"""Drift: what the served champion sees against what it was trained on, with Evidently PSI.

* **Current**: the prediction log's last ``window_hours`` hour partitions, only the rows
  the champion served, read column-projected (features + probability) with compact dtypes
  straight into Arrow; above ``sample_cap`` rows a uniform random sample with a fixed seed.
* **Reference**: the champion's training snapshot(s) (found through its MLflow run's
  ``lineage.json``), scored by the champion so the prediction distributions compare.
* **Drift**: Evidently's ``DataDriftPreset(method="psi", threshold=psi_threshold)`` over the
  features and the probability; one PSI per column, read back from the report.
* **Decision**: retrain when any feature's PSI or the prediction PSI is >= the threshold in
  ``consecutive_checks`` checks in a row, unless a training run is active or the cooldown after
  the last drift-triggered retrain has not passed (storm protection).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tasks import storage
from tasks.dataset_spec import PROJECT_ROOT, DatasetSpec

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

DRIFT_CONFIG = PROJECT_ROOT / "include" / "drift.yaml"
PREDICTION_COLUMN = "probability"
VERSION_COLUMN = "model_version"
MODEL_COLUMN = "model_name"


class DriftError(RuntimeError):
    """The check cannot be made (no champion, no reference); the message says what to do."""


class NotEnoughData(RuntimeError):
    """The current window holds fewer rows than ``min_rows``: no decision on too little data."""


@dataclass(frozen=True)
class DriftConfig:
    psi_threshold: float = 0.25
    window_hours: int = 24
    min_rows: int = 500
    consecutive_checks: int = 1
    cooldown_minutes: int = 360
    sample_cap: int = 1_000_000
    sample_seed: int = 0
    retrain_window_days: int = 1
    monitoring_experiment: str = "network_security_monitoring"

    def __post_init__(self) -> None:
        if not 0 < self.psi_threshold < math.inf:
            raise ValueError(f"psi_threshold must be positive, got {self.psi_threshold}")
        for name in ("window_hours", "min_rows", "consecutive_checks", "sample_cap", "retrain_window_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cooldown_minutes < 0:
            raise ValueError(f"cooldown_minutes must be 0 or more, got {self.cooldown_minutes}")

    def replace(self, **changes: Any) -> DriftConfig:
        """A copy with the non-None ``changes`` applied (run params override the file)."""
        values = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        return DriftConfig(**values)


def load_drift_config(path: Path = DRIFT_CONFIG) -> DriftConfig:
    """Read ``include/drift.yaml``; unknown keys or bad values fail naming the file."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(raw).__name__}")
    known = set(DriftConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return DriftConfig(**raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


# --- the current window ------------------------------------------------------------------


def window_partitions(window_end: dt.datetime, hours: int) -> list[str]:
    """The ``dt=YYYY-MM-DD/HH`` partitions of the ``hours`` hours before ``window_end`` (exclusive).

    An hourly run at 13:00 reads hours 12, 11, ...; a manual run at 13:20 reads hour 13 too.
    """
    last = window_end.astimezone(dt.UTC) - dt.timedelta(microseconds=1)
    end = last.replace(minute=0, second=0, microsecond=0)
    return [f"dt={moment:%Y-%m-%d}/{moment:%H}" for moment in (end - dt.timedelta(hours=h) for h in range(hours))][::-1]


def current_schema(spec: DatasetSpec) -> pa.Schema:
    """The columns the check reads from the prediction log, with compact types.

    Features in the spec's (small) integer types, the probability as float32, and the model
    name and version dictionary-encoded: 10M rows of them cost 80 MB, not 400 MB.
    """
    import pyarrow as pa

    label = pa.dictionary(pa.int32(), pa.string())
    fields = [pa.field(c.name, pa.from_numpy_dtype(_numpy_dtype(c.dtype))) for c in spec.features]
    return pa.schema(
        [
            *fields,
            pa.field(PREDICTION_COLUMN, pa.float32()),
            pa.field(MODEL_COLUMN, label),
            pa.field(VERSION_COLUMN, label),
        ]
    )


def _numpy_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name)


def read_object(body: bytes, key: str, schema: pa.Schema) -> pa.Table:
    """One prediction-log object (``.parquet`` or ``.jsonl``), projected and cast to ``schema``."""
    import pyarrow as pa
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if key.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(body), columns=schema.names, read_dictionary=[MODEL_COLUMN, VERSION_COLUMN])
    elif key.endswith((".jsonl", ".json")):
        # Arrow's JSON reader parses in C++ and drops the fields outside the schema; it
        # cannot produce dictionaries, so those two columns are read as strings and cast.
        plain = pa.schema([f.with_type(pa.string()) if pa.types.is_dictionary(f.type) else f for f in schema])
        options = pa_json.ParseOptions(explicit_schema=plain, unexpected_field_behavior="ignore")
        table = pa_json.read_json(io.BytesIO(body), parse_options=options)
    else:
        raise ValueError(f"{key}: not a prediction-log object (expected .parquet or .jsonl)")
    return table.select(schema.names).cast(schema)


def read_window(
    client: Any,
    bucket: str,
    prefix: str,
    partitions: list[str],
    spec: DatasetSpec,
    model: tuple[str, str] | None,
) -> tuple[pa.Table, int]:
    """The window's rows served by ``model`` = (registered name, version); all rows when None.

    Returns:
        The table (features, probability, model name and version) and the number of rows
        read before the model filter (other models and versions share the log).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = current_schema(spec)
    tables, read_rows = [], 0
    for partition in partitions:
        base = f"{prefix.strip('/')}/{partition}/" if prefix else f"{partition}/"
        for key in storage.list_keys(client, bucket, base):
            # Object by object, so only the kept rows of one object are ever held twice.
            table = read_object(storage.get_bytes(client, storage.S3Location(bucket, key)), key, schema)
            read_rows += table.num_rows
            if model is not None:
                name, version = model
                table = table.filter(
                    pc.and_(pc.equal(table[MODEL_COLUMN], name), pc.equal(table[VERSION_COLUMN], str(version)))
                )
            tables.append(table)
    return (pa.concat_tables(tables) if tables else schema.empty_table()), read_rows


def sample(table: pa.Table, cap: int, seed: int) -> pa.Table:
    """A uniform random sample of ``cap`` rows (fixed seed, original order), or the table if smaller."""
    import numpy as np

    if table.num_rows <= cap:
        return table
    indices = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=cap, replace=False))
    return table.take(indices)


def to_frame(table: pa.Table, spec: DatasetSpec) -> pd.DataFrame:
    """Features (the spec's dtypes) and the probability (float32), nothing else."""
    columns = [*spec.feature_names, PREDICTION_COLUMN]
    return table.select(columns).to_pandas()


# --- the reference ------------------------------------------------------------------------


def champion_reference(tracking_uri: str, model_name: str) -> dict[str, Any]:
    """The champion's version, run and training snapshots (from its MLflow run's ``lineage.json``).

    Raises:
        DriftError: No champion: there is nothing to compare against yet.
    """
    import mlflow
    from mlflow import MlflowClient

    from tasks.registry import alias_version
    from tasks.train import CHAMPION, check_tracking_server

    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    version = alias_version(client, model_name, CHAMPION)
    if version is None:
        raise DriftError(
            f"registered model {model_name!r} has no champion: nothing is served, so there is no drift to "
            "measure. Run network_security_training first (make run)."
        )
    details = client.get_model_version(model_name, version)
    mlflow.set_tracking_uri(tracking_uri)
    lineage = mlflow.artifacts.load_dict(f"runs:/{details.run_id}/lineage.json")
    return {
        "model_name": model_name,
        "model_version": str(version),
        "run_id": details.run_id,
        "snapshot_uris": list(lineage["snapshot_uris"]),
        "content_hashes": list(lineage.get("content_hashes", [])),
    }


def reference_frame(client: Any, champion: dict[str, Any], spec: DatasetSpec) -> pd.DataFrame:
    """The champion's training snapshot(s), features only, scored by the champion."""
    import mlflow
    import pandas as pd

    from tasks.model_io import load_model

    frames = [
        storage.read_parquet(client, storage.parse_s3_uri(uri), columns=spec.feature_names)
        for uri in champion["snapshot_uris"]
    ]
    reference = pd.concat(frames, ignore_index=True).astype({c.name: c.dtype for c in spec.features})
    model = load_model(mlflow.get_tracking_uri(), champion["model_name"], champion["model_version"])
    classes = list(model.classes_)
    positive = classes.index(spec.positive_class)
    reference[PREDICTION_COLUMN] = model.predict_proba(reference[spec.feature_names])[:, positive].astype("float32")
    return reference


# --- PSI with Evidently -------------------------------------------------------------------


def psi_report(reference: pd.DataFrame, current: pd.DataFrame, spec: DatasetSpec, threshold: float) -> tuple[Any, dict]:
    """Evidently's data drift preset with PSI on every feature and the probability.

    Returns:
        The Evidently snapshot (for HTML) and ``{column: psi}``.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    categorical = [c.name for c in spec.features if c.kind == "categorical"]
    numerical = [c.name for c in spec.features if c.kind != "categorical"] + [PREDICTION_COLUMN]
    definition = DataDefinition(categorical_columns=categorical, numerical_columns=numerical)
    columns = [*spec.feature_names, PREDICTION_COLUMN]
    report = Report([DataDriftPreset(columns=columns, method="psi", threshold=threshold)])
    snapshot = report.run(
        current_data=Dataset.from_pandas(current[columns], data_definition=definition),
        reference_data=Dataset.from_pandas(reference[columns], data_definition=definition),
    )
    psi = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config") or {}
        if config.get("type", "").endswith("ValueDrift"):
            psi[config["column"]] = float(metric["value"])
    missing = sorted(set(columns) - set(psi))
    if missing:
        raise DriftError(f"Evidently returned no PSI for {missing}")
    return snapshot, psi


def summarize(
    psi: dict[str, float],
    threshold: float,
    *,
    window: dict[str, Any],
    rows: dict[str, int],
    champion: dict[str, Any],
) -> dict[str, Any]:
    """The JSON summary of one check (what the drift DAG stores, logs and decides on)."""
    features = {k: round(v, 6) for k, v in psi.items() if k != PREDICTION_COLUMN}
    drifted = sorted((k for k, v in features.items() if v >= threshold), key=lambda k: -features[k])
    prediction_psi = round(psi[PREDICTION_COLUMN], 6)
    return {
        "psi_threshold": threshold,
        "feature_psi": features,
        "prediction_psi": prediction_psi,
        "drifted_features": drifted,
        "drifted_share": round(len(drifted) / len(features), 4),
        "max_psi": max([*features.values(), prediction_psi]),
        "drift_detected": bool(drifted) or prediction_psi >= threshold,
        "window": window,
        "rows": rows,
        "sampled": rows["evaluated"] < rows["current"],
        "champion": {k: champion[k] for k in ("model_name", "model_version", "run_id")},
        "reference_snapshots": champion["snapshot_uris"],
    }


# --- the decision ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    trigger: bool
    outcome: str  # retrain | no_drift | drift_pending | training_active | cooldown
    reason: str


def decide(
    drift_detected: bool,
    previous_detections: list[bool],
    *,
    consecutive_checks: int,
    active_training_runs: int,
    last_trigger_at: dt.datetime | None,
    window_end: dt.datetime,
    cooldown: dt.timedelta,
) -> Decision:
    """The retrain rule with storm protection.

    Args:
        drift_detected: This check found a PSI >= the threshold.
        previous_detections: ``drift_detected`` of the previous checks, newest first.
        consecutive_checks: Checks in a row that must detect drift (K).
        active_training_runs: Queued or running training runs right now.
        last_trigger_at: Window end of the last check that triggered a retrain.
        window_end: This check's window end.
        cooldown: Quiet time after a drift-triggered retrain.
    """
    if not drift_detected:
        return Decision(False, "no_drift", "no feature PSI and no prediction PSI at or above the threshold")
    streak = 1
    for detected in previous_detections:
        if not detected or streak >= consecutive_checks:
            break
        streak += 1
    if streak < consecutive_checks:
        return Decision(False, "drift_pending", f"drift in {streak} of the {consecutive_checks} consecutive checks")
    if active_training_runs:
        return Decision(
            False,
            "training_active",
            f"{active_training_runs} training run(s) queued or running: not triggering another",
        )
    if last_trigger_at is not None and window_end - last_trigger_at < cooldown:
        until = last_trigger_at + cooldown
        return Decision(
            False,
            "cooldown",
            f"cooldown after the retrain triggered at {last_trigger_at:%Y-%m-%dT%H:%M}Z, until {until:%Y-%m-%dT%H:%M}Z",
        )
    return Decision(True, "retrain", f"drift in {streak} consecutive check(s)")


def trigger_run_id(dataset: str, window_end: dt.datetime) -> str:
    """One training run per drift window: a retried trigger finds it and creates nothing."""
    return f"drift__{dataset}__{window_end.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%S}"


def retrain_reason(summary: dict[str, Any]) -> str:
    drifted = summary["drifted_features"]
    shown = ", ".join(drifted[:5]) + (f" and {len(drifted) - 5} more" if len(drifted) > 5 else "")
    parts = [f"max PSI {summary['max_psi']:.3f} >= {summary['psi_threshold']}"]
    if drifted:
        parts.append(f"drifted features: {shown}")
    parts.append(f"prediction PSI {summary['prediction_psi']:.3f}")
    return "drift: " + "; ".join(parts)


def newest_labelled_day(client: Any, bucket: str, raw_prefix: str, not_after: str) -> str | None:
    """The newest ``ds`` with a drop in the landing zone, on or before ``not_after``."""
    paginator = client.get_paginator("list_objects_v2")
    days = []
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{raw_prefix.strip('/')}/ds=", Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            day = common["Prefix"].rstrip("/").rsplit("ds=", 1)[-1]
            if day <= not_after:
                days.append(day)
    return max(days) if days else None


def render_html(snapshot: Any) -> bytes:
    """The Evidently report as one self-contained HTML page."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.html"
        snapshot.save_html(str(path))
        return path.read_bytes()


def write_outputs(client: Any, bucket: str, prefix: str, html: bytes, summary: dict[str, Any]) -> dict[str, str]:
    """``report.html`` and ``metrics.json`` under ``s3://<bucket>/<prefix>/``."""
    base = storage.S3Location(bucket, prefix.strip("/"))
    return {
        "report_uri": storage.put_bytes(client, base.child("report.html"), html, content_type="text/html"),
        "summary_uri": storage.put_bytes(client, base.child("metrics.json"), json.dumps(summary, indent=2).encode()),
    }
