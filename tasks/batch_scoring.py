"""Batch scoring: a day's backlog scored by a registered model version, as the server would answer.

::

    s3://<raw>/<backlog prefix>/ds=YYYY-MM-DD/*.csv|*.parquet        the backlog (the spec's features; other columns ignored)
    s3://<lake>/batch_scores/<dataset>/ds=YYYY-MM-DD/predictions/*.parquet one row per scored backlog row
    s3://<lake>/batch_scores/<dataset>/ds=YYYY-MM-DD/rejected.parquet      rows that fail the spec, with the reason
    s3://<lake>/batch_scores/<dataset>/ds=YYYY-MM-DD/manifest.json          counts, version, every key written
    s3://<lake>/predictions/<model_name>/dt=.../HH/batch-<ds>-<file>-<chunk>.parquet   the prediction log

* **Same answers as the server**: the model is the registered pipeline object, scored through
  ``serving.predictor.build_predictor`` exactly as the model server builds it at load time,
  with ``Predictor.predict`` (the server's ``/predict/batch`` path). For batch-invariant models
  (forests, trees, row-wise preprocessing) every label and probability is bit-identical to
  the server's; for BLAS-based estimators they agree to rounding in the last bits.
* **Flat memory**: each backlog file is streamed to a temporary file and read ``chunk_rows`` at a
  time; a scored chunk is encoded once as parquet, written to the prediction log and copied
  (inside S3) as a part of the output dataset by a background thread while the next chunk
  is scored; at most a few chunks are in memory at any time.
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
from tasks.model_io import load_model

if TYPE_CHECKING:
    import pandas as pd
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
    def predictions_dir(self) -> storage.S3Location:
        """A parquet dataset: one part per scored chunk (``part-<file>-<chunk>.parquet``)."""
        return self.output_dir.child("predictions")

    def output_key(self, file_stem: str, chunk: int) -> str:
        return self.predictions_dir.child(f"part-{file_stem}-{chunk:05d}.parquet").key

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


def load_scoring_model(tracking_uri: str, model_name: str, version: str | None, spec: DatasetSpec) -> ScoringModel:
    """The registered version (the champion when ``version`` is None) with the server's predictor.

    Raises:
        BatchScoringError: No champion and no version given.
    """
    from mlflow import MlflowClient

    from tasks.tracking import CHAMPION, alias_version, check_tracking_server

    check_tracking_server(tracking_uri)
    if version is None:
        version = alias_version(MlflowClient(tracking_uri=tracking_uri), model_name, CHAMPION)
        if version is None:
            raise BatchScoringError(
                f"registered model {model_name!r} has no champion to score with: train one first "
                "(make run) or name a model version"
            )
    return scoring_model(load_model(tracking_uri, model_name, str(version)), spec, model_name, str(version))


# --- reading the backlog -----------------------------------------------------------------------


def backlog_files(client: Any, layout: BatchLayout) -> list[str]:
    """The day's backlog keys (``.csv`` and ``.parquet``), sorted."""
    keys = storage.list_keys(client, layout.backlog.bucket, layout.backlog.key)
    return [k for k in keys if k.endswith(BACKLOG_SUFFIXES)]


def read_chunks(path: Path, key: str, spec: DatasetSpec, chunk_rows: int) -> Iterator[np.ndarray]:
    """The spec's feature columns of a local backlog file, ``chunk_rows`` rows at a time, as float64 matrices.

    float64 holds every value of the spec's int8..int32 and float types exactly, so a value
    that is out of range or not whole is seen (and rejected) instead of wrapped or rounded;
    a missing value is NaN.

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
        for batch in _rebatch(batches, chunk_rows):
            yield _matrix(batch, names)
    except pa.ArrowInvalid as err:
        raise BatchScoringError(
            f"backlog {key} cannot be read as the {spec.name!r} features ({err}); fix or remove the file and rerun"
        ) from err
    except KeyError as err:
        raise BatchScoringError(f"backlog {key} lacks a feature column ({err})") from err


def _matrix(batch: pa.RecordBatch, names: list[str]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    # Column-major: filled, checked and encoded column by column (and the server's one-hot reads columns).
    matrix = np.empty((batch.num_rows, len(names)), dtype=np.float64, order="F")
    for position, name in enumerate(names):
        column = batch.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            column = pc.cast(column, pa.float64())  # numbers stored as text parse; anything else raises
        # Integer columns with nulls come out as float64 with NaN.
        matrix[:, position] = column.to_numpy(zero_copy_only=False)
    return matrix


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
    bad = _invalid_rows(matrix, spec)
    if bad.any():
        reasons[bad] = _reasons(matrix[bad], spec)
    return reasons


def _invalid_rows(matrix: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Rows failing any check, vectorised over the whole chunk (the common case: none)."""
    bad = np.isnan(matrix).any(axis=1)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for position, column in enumerate(spec.features):
        if column.kind == CATEGORICAL:
            groups.setdefault(tuple(column.allowed_values), []).append(position)
        else:
            values = matrix[:, position]
            if column.min_value is not None:
                bad |= values < column.min_value
            if column.max_value is not None:
                bad |= values > column.max_value
            if column.is_integer:
                limits = np.iinfo(np.dtype(column.dtype))
                bad |= (values != np.round(values)) | (values < limits.min) | (values > limits.max)
            bad |= np.isinf(values)
    for allowed, positions in groups.items():
        block = matrix[:, positions]
        # A few equality tests beat np.isin for the handful of values a categorical feature has.
        hit = np.zeros(block.shape, dtype=bool)
        for value in allowed:
            hit |= block == value
        bad |= ~hit.all(axis=1)
    return bad


def _reasons(matrix: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """The first failing check of each (bad) row, named: ``<feature>: <problem>``."""
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
    request_ids: pa.Array,
    *,
    spec: DatasetSpec,
    model: ScoringModel,
    timestamp: str,
) -> pa.Table:
    """Prediction-log records of scored rows (the serving app's keys in its order, then ``source``).

    The columns that are the same on every row are dictionary-encoded (one value each).
    """
    import pyarrow as pa

    rows = len(request_ids)

    def constant(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([value]))

    columns: dict[str, Any] = {
        "request_id": request_ids,
        "timestamp": constant(timestamp),
        "model_name": constant(model.name),
        "model_version": constant(model.version),
    }
    for position, column in enumerate(spec.features):
        columns[column.name] = pa.array(matrix[:, position].astype(column.dtype))
    columns["label"] = pa.array(labels.astype(spec.target.dtype))
    columns["probability"] = pa.array(probabilities, type=pa.float64())
    columns["source"] = constant(SOURCE)
    return pa.table(columns)


def request_ids(ds: str, stem: str, positions: np.ndarray) -> pa.Array:
    """``batch-<ds>-<file>:<row>`` for each row position (the contract's ``<request_id>:<index>``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(f"batch-{ds}-{stem}:", pc.cast(pa.array(positions), pa.string()), "")


class _ChunkWriter:
    """Writes scored chunks from one background thread while the next chunk is scored.

    Parquet encoding and S3 calls release the GIL, so on two cores writing overlaps scoring;
    at most ``pending`` chunks wait, which bounds the memory to a few chunks.
    """

    def __init__(self, client: Any, bucket: str, pending: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.client = client
        self.bucket = bucket
        self.pending = pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer")
        self._futures: list[Any] = []

    def submit(self, table: pa.Table, log_key: str, output_key: str) -> None:
        while len(self._futures) >= self.pending:
            self._futures.pop(0).result()
        self._futures.append(self._pool.submit(self._write, table, log_key, output_key))

    def _write(self, table: pa.Table, log_key: str, output_key: str) -> None:
        storage.put_bytes(self.client, storage.S3Location(self.bucket, log_key), _parquet_bytes(table))
        # The output part is the same object: copied inside S3, encoded once.
        storage.copy(self.client, storage.S3Location(self.bucket, log_key), storage.S3Location(self.bucket, output_key))

    def close(self) -> None:
        """Wait for every write; raise the first failure."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


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
        label counts, the output URIs and every key written.

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
    output_keys: list[str] = []
    with tempfile.TemporaryDirectory(prefix="batch-scoring-") as folder:
        rejected_path = Path(folder) / "rejected.parquet"
        rejected_writer = None
        writer = _ChunkWriter(client, layout.lake_bucket)
        try:
            for key in keys:
                local = Path(folder) / "backlog"
                with storage.reachable(client):
                    client.download_file(layout.backlog.bucket, key, str(local))
                stem, row = file_stem(key), 0
                for chunk_index, matrix in enumerate(read_chunks(local, key, spec, config.chunk_rows)):
                    positions = np.arange(row, row + len(matrix))
                    row += len(matrix)
                    counts["rows_read"] += len(matrix)
                    reasons = reject_reasons(matrix, spec)
                    bad = reasons != ""
                    if bad.any():
                        counts["rows_rejected"] += int(bad.sum())
                        table = _rejected_table(
                            matrix[bad], request_ids(layout.ds, stem, positions[bad]), reasons[bad], spec
                        )
                        if rejected_writer is None:
                            rejected_writer = _parquet_writer(rejected_path, table.schema)
                        rejected_writer.write_table(table)
                        matrix, positions = matrix[~bad], positions[~bad]
                    if not len(matrix):
                        continue
                    labels, probabilities = score_chunk(model, matrix)
                    table = scored_table(
                        matrix,
                        labels,
                        probabilities,
                        request_ids(layout.ds, stem, positions),
                        spec=spec,
                        model=model,
                        timestamp=timestamp,
                    )
                    log_keys.append(layout.log_key(model.name, scored_at, stem, chunk_index))
                    output_keys.append(layout.output_key(stem, chunk_index))
                    writer.submit(table, log_keys[-1], output_keys[-1])
                    counts["rows_scored"] += len(matrix)
                    counts["chunks"] += 1
                    for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
                        label_counts[str(label)] = label_counts.get(str(label), 0) + int(count)
                local.unlink()
        finally:
            writer.close()
            if rejected_writer is not None:
                rejected_writer.close()
        rejected_uri = None
        if rejected_writer is not None:
            with storage.reachable(client):
                client.upload_file(str(rejected_path), layout.rejected.bucket, layout.rejected.key)
            rejected_uri = layout.rejected.uri
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
        "predictions_uri": layout.predictions_dir.uri + "/",
        "rejected_uri": rejected_uri,
        "output_keys": output_keys,
        "prediction_log_keys": log_keys,
        "chunk_rows": config.chunk_rows,
    }
    manifest["manifest_uri"] = storage.put_json(client, layout.manifest, manifest)
    stale = sorted(set(previous) - set(log_keys) - set(output_keys))
    if rejected_uri is None:
        stale += [layout.rejected.key] if storage.exists(client, layout.rejected) else []
    for start in range(0, len(stale), 1000):
        with storage.reachable(client):
            client.delete_objects(
                Bucket=layout.lake_bucket, Delete={"Objects": [{"Key": k} for k in stale[start : start + 1000]]}
            )
    log.info(
        "batch scoring %s ds=%s with %s v%s: %d scored, %d rejected, %d chunks, %d stale objects removed",
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
    """The keys the previous run of this day wrote (to delete those this run does not rewrite)."""
    if not storage.exists(client, layout.manifest):
        return []
    previous = storage.get_json(client, layout.manifest)
    return [*previous.get("prediction_log_keys", []), *previous.get("output_keys", [])]


_CONSTANT_COLUMNS = ["timestamp", "model_name", "model_version", "source"]


def _parquet_writer(path: Path, schema: pa.Schema) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetWriter(path, schema, compression="zstd")


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    # Dictionaries only where values repeat: on the small-integer features they cost time for nothing.
    pq.write_table(table, sink, compression="zstd", use_dictionary=_CONSTANT_COLUMNS)
    return sink.getvalue().to_pybytes()


def _rejected_table(matrix: np.ndarray, ids: pa.Array, reasons: np.ndarray, spec: DatasetSpec) -> pa.Table:
    import pyarrow as pa

    columns = {"request_id": ids, "reason": pa.array(reasons.tolist(), type=pa.string())}
    columns.update({c.name: pa.array(matrix[:, i]) for i, c in enumerate(spec.features)})
    return pa.table(columns)


def read_scores(client: Any, manifest: dict[str, Any], columns: list[str] | None = None) -> pd.DataFrame:
    """A scored day's predictions in backlog order (the parts its manifest lists)."""
    import pandas as pd

    bucket = storage.parse_s3_uri(manifest["predictions_uri"]).bucket
    parts = [storage.read_parquet(client, storage.S3Location(bucket, key), columns) for key in manifest["output_keys"]]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


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


# --- the batch scoring DAG's steps ---------------------------------------------------------------


def _layout(plan: Any, chunk_rows: int | None) -> BatchLayout:
    config = load_batch_scoring_config().replace(chunk_rows=chunk_rows)
    return BatchLayout(plan.settings.raw_bucket, plan.settings.lake_bucket, plan.spec, plan.ds, config)


def backlog_location(plan: Any, chunk_rows: int | None = None) -> dict[str, str]:
    """The day's backlog folder for the DAG's sensor: ``bucket``, ``key_pattern`` (a wildcard) and ``uri``.

    Args:
        plan: The run's ``tasks.plan.RunPlan`` (dataset, day, buckets).
        chunk_rows: The run's chunk size override (validated here, before anything waits).
    """
    layout = _layout(plan, chunk_rows)
    return {"bucket": layout.backlog.bucket, "key_pattern": layout.backlog.key + "*", "uri": layout.backlog.uri}


def score_day(
    client: Any, plan: Any, scored_at: dt.datetime, model_version: str | None = None, chunk_rows: int | None = None
) -> dict[str, Any]:
    """The batch scoring DAG's step: ``run_batch_scoring`` for the plan's dataset, model and day.

    Args:
        client: boto3 S3 client.
        plan: The run's ``tasks.plan.RunPlan``.
        scored_at: The run's data interval end (records' timestamp and log partition: a rerun rewrites them).
        model_version: Score with this version instead of the champion.
        chunk_rows: Override of ``include/batch_scoring.yaml``'s chunk size.

    Returns:
        The manifest without the key lists (small enough for XCom; they stay in ``manifest.json``).
    """
    layout = _layout(plan, chunk_rows)
    manifest = run_batch_scoring(
        client,
        tracking_uri=plan.settings.mlflow_tracking_uri,
        raw_bucket=layout.raw_bucket,
        lake_bucket=layout.lake_bucket,
        spec=plan.spec,
        model_name=plan.model_name,
        ds=plan.ds,
        scored_at=scored_at,
        model_version=model_version,
        config=layout.config,
    )
    return {k: v for k, v in manifest.items() if k not in ("output_keys", "prediction_log_keys")}
