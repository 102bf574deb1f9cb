"""Batch scoring: a day's backlog scored by a registered model version, as the server would answer.

::

    s3://<raw>/<backlog prefix>/ds=YYYY-MM-DD/*.csv|*.parquet        the backlog (the spec's features; other columns ignored)
    s3://<lake>/batch_scores/<dataset>/ds=YYYY-MM-DD/predictions.parquet   one row per scored backlog row
    s3://<lake>/batch_scores/<dataset>/ds=YYYY-MM-DD/rejected.parquet      rows that fail the spec, with the reason
    s3://<lake>/batch_scores/<dataset>/ds=YYYY-MM-DD/manifest.json          counts, version, every key written
    s3://<lake>/predictions/<model_name>/dt=.../HH/batch-<ds>-<file>-<chunk>.parquet   the prediction log

* **Same answers as the server**: the model is the registered pipeline object, scored through
  ``serving.predictor.build_predictor`` exactly as the model server builds it at load time,
  with ``Predictor.predict`` (the server's ``/predict/batch`` path). For batch-invariant models
  (forests, trees, row-wise preprocessing) every label and probability is bit-identical to
  the server's; for BLAS-based estimators they agree to rounding in the last bits.
* **Flat memory**: each backlog file is streamed to a temporary file, read ``chunk_rows`` at a
  time, scored, and appended to the output parquet as one row group; only one chunk is in
  memory at a time.
* **Idempotent per ds**: the request ids (``batch-<ds>-<file>:<row>``), the log keys and the
  output keys derive from ``ds``, the file names and ``scored_at`` (the DAG passes its data
  interval end). A rerun overwrites them; the keys a previous run of the same ``ds`` wrote
  and this one did not (fewer chunks, another ``scored_at``) are deleted, found through the
  previous manifest.
* **Monitoring sees them**: every scored row is also a prediction-log record (``source: batch``)
  of the model's partition, so the drift and quality checks read them like served traffic.
* **Bad rows**: a row with a missing value, a value outside a categorical feature's allowed
  values, outside a numeric feature's bounds, or not whole for an integer feature is not
  scored; it goes to ``rejected.parquet`` with the reason and is counted. The backlog files
  are never modified.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from tasks import storage
from tasks.dataset_spec import CATEGORICAL, PROJECT_ROOT, DatasetSpec
from tasks.layout import check_ds

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

BATCH_SCORING_CONFIG = PROJECT_ROOT / "include" / "batch_scoring.yaml"
BACKLOG_SUFFIXES = (".csv", ".parquet")
SOURCE = "batch"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class BatchScoringError(RuntimeError):
    """The backlog cannot be scored as asked; the message names the file or model and the fix."""


@dataclass(frozen=True)
class BatchScoringConfig:
    """``include/batch_scoring.yaml``.

    Attributes:
        backlog_prefix: Key prefix of the backlog in the raw bucket; ``{raw_prefix}`` and
            ``{dataset}`` are replaced by the dataset spec's.
        chunk_rows: Rows read, scored and written at a time (memory grows with it).
        output_area: Lake folder of the outputs (``<area>/<dataset>/ds=.../``).
        log_prefix: Key prefix of the prediction log.
    """

    backlog_prefix: str = "{raw_prefix}_backlog"
    chunk_rows: int = 50_000
    output_area: str = "batch_scores"
    log_prefix: str = "predictions"

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {self.chunk_rows}")
        for name in ("backlog_prefix", "output_area", "log_prefix"):
            if not getattr(self, name).strip("/"):
                raise ValueError(f"{name} must not be empty")

    def replace(self, **changes: Any) -> BatchScoringConfig:
        values = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        return BatchScoringConfig(**values)


def load_batch_scoring_config(path: Path = BATCH_SCORING_CONFIG) -> BatchScoringConfig:
    """Read ``include/batch_scoring.yaml``; unknown keys or bad values fail naming the file."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(BatchScoringConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(BatchScoringConfig.__dataclass_fields__)}")
    try:
        return BatchScoringConfig(**raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


@dataclass(frozen=True)
class BatchLayout:
    """Where one dataset's day of batch scoring reads and writes."""

    raw_bucket: str
    lake_bucket: str
    spec: DatasetSpec
    ds: str
    config: BatchScoringConfig = BatchScoringConfig()

    def __post_init__(self) -> None:
        check_ds(self.ds)

    @property
    def backlog(self) -> storage.S3Location:
        prefix = self.config.backlog_prefix.format(raw_prefix=self.spec.raw_prefix, dataset=self.spec.name)
        return storage.S3Location(self.raw_bucket, f"{prefix.strip('/')}/ds={self.ds}/")

    @property
    def output_dir(self) -> storage.S3Location:
        return storage.S3Location(self.lake_bucket, f"{self.config.output_area}/{self.spec.name}/ds={self.ds}")

    @property
    def predictions(self) -> storage.S3Location:
        return self.output_dir.child("predictions.parquet")

    @property
    def rejected(self) -> storage.S3Location:
        return self.output_dir.child("rejected.parquet")

    @property
    def manifest(self) -> storage.S3Location:
        return self.output_dir.child("manifest.json")

    def log_key(self, model_name: str, scored_at: dt.datetime, file_stem: str, chunk: int) -> str:
        moment = scored_at.astimezone(dt.UTC)
        return (
            f"{self.config.log_prefix.strip('/')}/{model_name}/dt={moment:%Y-%m-%d}/{moment:%H}/"
            f"batch-{self.ds}-{file_stem}-{chunk:05d}.parquet"
        )


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringModel:
    """A loaded model version and the predictor the server would build for it."""

    name: str
    version: str
    pipeline: Any
    predictor: Any
    positive_class: Any

    @property
    def positive_column(self) -> int:
        """Column of the positive class in ``predict_proba`` (classes are sorted: -1 comes first)."""
        return [c.item() if hasattr(c, "item") else c for c in self.pipeline.classes_].index(self.positive_class)


def scoring_model(pipeline: Any, spec: DatasetSpec, name: str, version: str) -> ScoringModel:
    """The server's predictor over ``pipeline`` (compiled and verified when possible).

    Raises:
        BatchScoringError: The pipeline is not a classifier of the spec's classes.
    """
    from serving.predictor import build_predictor

    classes = sorted(c.item() if hasattr(c, "item") else c for c in getattr(pipeline, "classes_", []))
    if classes != sorted(spec.target.allowed_values):
        raise BatchScoringError(
            f"{name} v{version} predicts {classes}, the dataset {spec.name!r} has labels "
            f"{sorted(spec.target.allowed_values)}: wrong model for this dataset"
        )
    return ScoringModel(name, str(version), pipeline, build_predictor(pipeline, spec.features), spec.positive_class)


def _load_pipeline(tracking_uri: str, model_name: str, version: str) -> Any:
    # replaced by tasks.model_io.load_model at integration
    import mlflow.sklearn

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.sklearn.load_model(f"models:/{model_name}/{version}")


def load_scoring_model(tracking_uri: str, model_name: str, version: str | None, spec: DatasetSpec) -> ScoringModel:
    """The registered version (the champion when ``version`` is None) with the server's predictor.

    Raises:
        BatchScoringError: No champion and no version given.
    """
    from mlflow import MlflowClient

    from tasks.registry import alias_version
    from tasks.train import CHAMPION, check_tracking_server

    check_tracking_server(tracking_uri)
    if version is None:
        version = alias_version(MlflowClient(tracking_uri=tracking_uri), model_name, CHAMPION)
        if version is None:
            raise BatchScoringError(
                f"registered model {model_name!r} has no champion to score with: train one first "
                "(make run) or name a model version"
            )
    return scoring_model(_load_pipeline(tracking_uri, model_name, str(version)), spec, model_name, str(version))


# --- reading the backlog -----------------------------------------------------------------------


def backlog_files(client: Any, layout: BatchLayout) -> list[str]:
    """The day's backlog keys (``.csv`` and ``.parquet``), sorted."""
    keys = storage.list_keys(client, layout.backlog.bucket, layout.backlog.key)
    return [k for k in keys if k.endswith(BACKLOG_SUFFIXES)]


def read_chunks(path: Path, key: str, spec: DatasetSpec, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The spec's feature columns of a local backlog file, ``chunk_rows`` rows at a time, as float64.

    float64 holds every value of the spec's int8..int32 and float types exactly, so a value
    that is out of range or not whole is seen (and rejected) instead of wrapped or rounded.

    Raises:
        BatchScoringError: A feature column is missing or holds text.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    names = spec.feature_names
    try:
        if key.endswith(".parquet"):
            source = pq.ParquetFile(path)
            missing = sorted(set(names) - set(source.schema_arrow.names))
            if missing:
                raise BatchScoringError(f"backlog {key} lacks feature column(s) {missing}")
            batches = source.iter_batches(batch_size=chunk_rows, columns=names)
        else:
            # Blocks of about chunk_rows rows (a row of small numbers is ~3 bytes per column).
            read = pa_csv.ReadOptions(block_size=max(1 << 20, min(64 << 20, chunk_rows * len(names) * 4)))
            convert = pa_csv.ConvertOptions(
                include_columns=names, column_types={n: pa.float64() for n in names}, strings_can_be_null=True
            )
            batches = pa_csv.open_csv(path, read_options=read, convert_options=convert)
        yield from _rebatch((_as_float64(batch, names) for batch in batches), chunk_rows)
    except pa.ArrowInvalid as err:
        raise BatchScoringError(
            f"backlog {key} cannot be read as the {spec.name!r} features ({err}); fix or remove the file and rerun"
        ) from err
    except KeyError as err:
        raise BatchScoringError(f"backlog {key} lacks a feature column ({err})") from err


def _as_float64(batch: pa.RecordBatch, names: list[str]) -> pa.RecordBatch:
    import pyarrow as pa

    return pa.record_batch([batch.column(n).cast(pa.float64()) for n in names], names=names)


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly ``size`` rows (the last may be shorter) from batches of any size."""
    import pyarrow as pa

    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, size).to_batches()[0]
            rest = table.slice(size)
            pending, held = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def reject_reasons(matrix: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Why each row cannot be scored (``""`` when it can): the checks the request schema makes.

    Args:
        matrix: Rows x the spec's features, float64.
        spec: The dataset.
    """
    reasons = np.full(matrix.shape[0], "", dtype=object)
    for position, column in enumerate(spec.features):
        values = matrix[:, position]
        problems = [(np.isnan(values), "missing")]
        if column.kind == CATEGORICAL:
            problems.append((~np.isnan(values) & ~np.isin(values, list(column.allowed_values)), "not an allowed value"))
        else:
            if column.min_value is not None:
                problems.append((values < column.min_value, f"below {column.min_value}"))
            if column.max_value is not None:
                problems.append((values > column.max_value, f"above {column.max_value}"))
            if column.is_integer:
                limits = np.iinfo(np.dtype(column.dtype))
                problems.append((np.isfinite(values) & (values != np.round(values)), "not a whole number"))
                problems.append(((values < limits.min) | (values > limits.max), f"out of {column.dtype}"))
            else:
                problems.append((np.isinf(values), "infinite"))
        for mask, text in problems:
            hit = mask & (reasons == "")
            if hit.any():
                reasons[hit] = f"{column.name}: {text}"
    return reasons


# --- scoring -----------------------------------------------------------------------------------


def file_stem(key: str) -> str:
    """A backlog file's name without its suffix, safe in request ids and S3 keys."""
    name = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return _UNSAFE.sub("_", name) or "file"


def score_chunk(model: ScoringModel, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and positive-class probabilities of valid rows, the way the server scores a batch.

    Raises:
        BatchScoringError: The model returned a non-finite probability (the server answers 503).
    """
    labels, probabilities = model.predictor.predict(matrix)
    positive = np.asarray(probabilities)[:, model.positive_column].astype(np.float64)
    if not np.isfinite(positive).all():
        raise BatchScoringError(f"{model.name} v{model.version} returned non-finite probabilities")
    return np.asarray(labels), positive


def scored_table(
    matrix: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    request_ids: list[str],
    *,
    spec: DatasetSpec,
    model: ScoringModel,
    timestamp: str,
) -> pa.Table:
    """Prediction-log records of scored rows (the serving app's keys in its order, then ``source``)."""
    import pyarrow as pa

    rows = len(request_ids)
    columns: dict[str, Any] = {
        "request_id": pa.array(request_ids, type=pa.string()),
        "timestamp": pa.array([timestamp] * rows, type=pa.string()),
        "model_name": pa.array([model.name] * rows, type=pa.string()),
        "model_version": pa.array([model.version] * rows, type=pa.string()),
    }
    for position, column in enumerate(spec.features):
        columns[column.name] = pa.array(matrix[:, position].astype(column.dtype))
    columns["label"] = pa.array(labels.astype(spec.target.dtype))
    columns["probability"] = pa.array(probabilities, type=pa.float64())
    columns["source"] = pa.array([SOURCE] * rows, type=pa.string())
    return pa.table(columns)


def score_backlog(
    client: Any,
    layout: BatchLayout,
    model: ScoringModel,
    *,
    scored_at: dt.datetime,
) -> dict[str, Any]:
    """Score the day's backlog in chunks; write the predictions, the rejects, the log and a manifest.

    Args:
        client: boto3 S3 client.
        layout: The day's locations (and the chunk size).
        model: The model and its predictor (``load_scoring_model``).
        scored_at: The records' timestamp and prediction-log partition (the DAG's data interval end).

    Returns:
        The manifest: dataset, ds, model, counts (files, rows read, scored, rejected, chunks),
        label counts, the output URIs and every prediction-log key written.

    Raises:
        BatchScoringError: No backlog for the day, or a backlog file that cannot be read.
    """
    spec, config = layout.spec, layout.config
    keys = backlog_files(client, layout)
    if not keys:
        raise BatchScoringError(
            f"no backlog for {spec.name} ds={layout.ds} at {layout.backlog.uri} (*.csv or *.parquet); nothing to score"
        )
    previous = _previous_manifest(client, layout)
    timestamp = scored_at.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    counts = {"files": len(keys), "rows_read": 0, "rows_scored": 0, "rows_rejected": 0, "chunks": 0}
    label_counts: dict[str, int] = {}
    log_keys: list[str] = []
    with tempfile.TemporaryDirectory(prefix="batch-scoring-") as folder:
        output_path, rejected_path = Path(folder) / "predictions.parquet", Path(folder) / "rejected.parquet"
        writers: dict[str, Any] = {}
        try:
            for key in keys:
                local = Path(folder) / "backlog"
                with storage.reachable(client):
                    client.download_file(layout.backlog.bucket, key, str(local))
                stem, row = file_stem(key), 0
                for chunk_index, batch in enumerate(read_chunks(local, key, spec, config.chunk_rows)):
                    matrix = np.column_stack(
                        [batch.column(i).to_numpy(zero_copy_only=False) for i in range(batch.num_columns)]
                    )
                    ids = np.array(
                        [f"batch-{layout.ds}-{stem}:{i}" for i in range(row, row + len(matrix))], dtype=object
                    )
                    row += len(matrix)
                    counts["rows_read"] += len(matrix)
                    reasons = reject_reasons(matrix, spec)
                    bad = reasons != ""
                    if bad.any():
                        counts["rows_rejected"] += int(bad.sum())
                        _append(
                            writers,
                            "rejected",
                            rejected_path,
                            _rejected_table(matrix[bad], ids[bad], reasons[bad], spec),
                        )
                    valid = matrix[~bad]
                    if not len(valid):
                        continue
                    labels, probabilities = score_chunk(model, valid)
                    table = scored_table(
                        valid, labels, probabilities, ids[~bad].tolist(), spec=spec, model=model, timestamp=timestamp
                    )
                    _append(writers, "predictions", output_path, table)
                    log_key = layout.log_key(model.name, scored_at, stem, chunk_index)
                    storage.put_bytes(client, storage.S3Location(layout.lake_bucket, log_key), _parquet_bytes(table))
                    log_keys.append(log_key)
                    counts["rows_scored"] += len(valid)
                    counts["chunks"] += 1
                    for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
                        label_counts[str(label)] = label_counts.get(str(label), 0) + int(count)
                local.unlink()
        finally:
            for writer in writers.values():
                writer.close()
        outputs = {"predictions_uri": None, "rejected_uri": None}
        for name, path, location in (
            ("predictions_uri", output_path, layout.predictions),
            ("rejected_uri", rejected_path, layout.rejected),
        ):
            if path.exists():
                with storage.reachable(client):
                    client.upload_file(str(path), location.bucket, location.key)
                outputs[name] = location.uri
            elif storage.exists(client, location):
                with storage.reachable(client):
                    client.delete_object(Bucket=location.bucket, Key=location.key)
    if counts["rows_rejected"]:
        log.warning(
            "%d of %d backlog rows rejected (see %s)", counts["rows_rejected"], counts["rows_read"], layout.rejected.uri
        )
    manifest = {
        "dataset": spec.name,
        "ds": layout.ds,
        "model_name": model.name,
        "model_version": model.version,
        "predictor": model.predictor.describe(),
        "scored_at": timestamp,
        "backlog_uris": [f"s3://{layout.backlog.bucket}/{k}" for k in keys],
        **counts,
        "labels": label_counts,
        **outputs,
        "prediction_log_keys": log_keys,
        "chunk_rows": config.chunk_rows,
    }
    manifest["manifest_uri"] = storage.put_json(client, layout.manifest, manifest)
    stale = sorted(set(previous) - set(log_keys))
    for start in range(0, len(stale), 1000):
        with storage.reachable(client):
            client.delete_objects(
                Bucket=layout.lake_bucket, Delete={"Objects": [{"Key": k} for k in stale[start : start + 1000]]}
            )
    log.info(
        "batch scoring %s ds=%s with %s v%s: %d scored, %d rejected, %d chunks, %d stale log objects removed",
        spec.name,
        layout.ds,
        model.name,
        model.version,
        counts["rows_scored"],
        counts["rows_rejected"],
        counts["chunks"],
        len(stale),
    )
    return manifest


def _previous_manifest(client: Any, layout: BatchLayout) -> list[str]:
    if not storage.exists(client, layout.manifest):
        return []
    return list(storage.get_json(client, layout.manifest).get("prediction_log_keys", []))


def _append(writers: dict[str, Any], name: str, path: Path, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    if name not in writers:
        writers[name] = pq.ParquetWriter(path, table.schema, compression="zstd")
    writers[name].write_table(table)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _rejected_table(matrix: np.ndarray, ids: np.ndarray, reasons: np.ndarray, spec: DatasetSpec) -> pa.Table:
    import pyarrow as pa

    columns = {"request_id": pa.array(ids.tolist(), type=pa.string()), "reason": pa.array(reasons.tolist())}
    columns.update({c.name: pa.array(matrix[:, i]) for i, c in enumerate(spec.features)})
    return pa.table(columns)


def run_batch_scoring(
    client: Any,
    *,
    tracking_uri: str,
    raw_bucket: str,
    lake_bucket: str,
    spec: DatasetSpec,
    model_name: str,
    ds: str,
    scored_at: dt.datetime,
    model_version: str | None = None,
    config: BatchScoringConfig | None = None,
) -> dict[str, Any]:
    """Score ``ds``'s backlog with ``model_version`` (default: the champion); see ``score_backlog``."""
    layout = BatchLayout(raw_bucket, lake_bucket, spec, ds, config or load_batch_scoring_config())
    if not backlog_files(client, layout):
        raise BatchScoringError(f"no backlog for {spec.name} ds={ds} at {layout.backlog.uri}; nothing to score")
    model = load_scoring_model(tracking_uri, model_name, model_version, spec)
    return score_backlog(client, layout, model, scored_at=scored_at)
