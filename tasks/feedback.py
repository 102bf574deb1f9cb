"""Delayed ground truth: the daily feedback drops, the prediction log they label, and the join.

Where things are::

    s3://<raw>/<feedback prefix>/ds=YYYY-MM-DD/*.csv                   labels, by the day they arrived
    s3://<lake>/predictions/<model_name>/dt=YYYY-MM-DD/HH/<object>     the prediction log (.jsonl, .parquet)
    s3://<lake>/predictions/dt=YYYY-MM-DD/HH/<object>                  its legacy partitions (all models)

A feedback row names the request id the server answered with, the true label and when it
was labelled (the column names come from the dataset spec's ``feedback:`` section). The
join of a window follows these rules:

* **Late labels**: a label joins any prediction of the model in the prediction window,
  however many days before the label it was made (the window reaches back
  ``lookback_days``, see ``tasks.quality``).
* **Duplicates**: a request id labelled more than once keeps its latest ``labelled_at``
  (ties: the later file, then the later row); the superseded rows are counted, and
  among them those whose label changed.
* **Unknown ids**: labels for request ids with no prediction of the model in the window
  are counted and ignored.
* **Bad input**: a feedback row without a request id, with a label outside the target's
  values or an unreadable time is counted and skipped; so is a feedback file or a
  prediction-log object that cannot be read (its key is reported). Nothing is deleted:
  the raw files stay where they are for someone to fix.

The prediction log is read object by object, projected to the needed columns and filtered
to the labelled request ids at once, so memory follows the labelled rows, not the log.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tasks import storage
from tasks.dataset_spec import DatasetSpec, FeedbackSpec

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

PREDICTION_LOG_PREFIX = "predictions"
TRUE_LABEL = "true_label"
LABELLED_AT = "labelled_at"
# Columns every prediction-log record has (CONTRACTS.md); the optional ones may be absent.
REQUIRED_LOG_COLUMNS = ("request_id", "model_name", "model_version", "label", "probability")
OPTIONAL_LOG_COLUMNS = ("timestamp", "source", "role", "shadow_model_version", "shadow_label", "shadow_probability")
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
_HOUR_PARTITION = re.compile(r"dt=(\d{4}-\d{2}-\d{2})/(\d{2})/")
MAX_REPORTED_KEYS = 20


class FeedbackError(ValueError):
    """Feedback cannot be used as asked; the message names the dataset or file and the fix."""


def feedback_spec(spec: DatasetSpec) -> FeedbackSpec:
    """The dataset's feedback shape.

    Raises:
        FeedbackError: The spec has no ``feedback:`` section.
    """
    if spec.feedback is None:
        where = spec.source_file or f"include/datasets/{spec.name}.yaml"
        raise FeedbackError(
            f"dataset {spec.name!r} declares no feedback: add a `feedback:` section (prefix, and optionally "
            f"request_id_column, label_column, labelled_at_column) to {where}"
        )
    return spec.feedback


def feedback_partition(raw_bucket: str, spec: DatasetSpec, ds: str) -> storage.S3Location:
    """``s3://<raw>/<feedback prefix>/ds=<ds>/``: the labels that arrived on ``ds``."""
    from tasks.layout import check_ds

    return storage.S3Location(raw_bucket, f"{feedback_spec(spec).prefix}/ds={check_ds(ds)}/")


def days_ending(last_day: str, days: int) -> list[str]:
    """The ``days`` ISO dates ending at ``last_day`` (inclusive), oldest first."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    end = dt.date.fromisoformat(last_day)
    return [(end - dt.timedelta(days=offset)).isoformat() for offset in range(days - 1, -1, -1)]


# --- writing feedback ------------------------------------------------------------------------


def publish_feedback(
    client: Any, raw_bucket: str, spec: DatasetSpec, feedback: pd.DataFrame, batch_id: str
) -> list[str]:
    """Write feedback rows as the day drops an upstream labelling process delivers.

    Each row lands in the partition of the day it was labelled (UTC), in a file named
    after ``batch_id``: publishing the same batch again overwrites its files, another
    batch adds its own next to them.

    Args:
        client: boto3 S3 client.
        raw_bucket: The raw (landing) bucket.
        spec: The dataset (its ``feedback`` section gives the prefix and the columns).
        feedback: Rows with the spec's feedback columns (``tasks.datagen.label_feedback``).
        batch_id: Names the files (letters, digits, ``._=-``), e.g. the traffic's seed.

    Returns:
        The URIs written, oldest day first.

    Raises:
        FeedbackError: No feedback section, a missing column or a bad ``batch_id``.
    """
    import pandas as pd

    shape = feedback_spec(spec)
    if not _BATCH_ID.match(batch_id):
        raise FeedbackError(f"batch_id {batch_id!r} must be 1-128 letters, digits or ._=- (it names S3 keys)")
    missing = [c for c in shape.column_names if c not in feedback.columns]
    if missing:
        raise FeedbackError(f"feedback rows lack column(s) {missing}; expected {shape.column_names}")
    frame = feedback[shape.column_names].copy()
    labelled_at = pd.to_datetime(frame[shape.labelled_at_column], utc=True)
    frame[shape.labelled_at_column] = labelled_at.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    storage.ensure_bucket(client, raw_bucket)
    uris = []
    for day, rows in frame.groupby(labelled_at.dt.strftime("%Y-%m-%d"), sort=True):
        buffer = io.StringIO()
        rows.to_csv(buffer, index=False)
        location = feedback_partition(raw_bucket, spec, str(day)).child(f"feedback-{batch_id}.csv")
        uris.append(storage.put_bytes(client, location, buffer.getvalue().encode(), content_type="text/csv"))
    return uris


# --- reading feedback ------------------------------------------------------------------------


@dataclass
class JoinCounts:
    """What reading and joining a window found (the JSON summary's ``feedback`` section).

    Attributes:
        feedback_partitions: URIs of the day partitions that held feedback files.
        feedback_files: Files read.
        feedback_rows: Valid rows read (before deduplication).
        invalid_feedback_rows: Rows skipped (no request id, unknown label, unreadable time).
        bad_feedback_files: Files that could not be read at all, with the reason.
        duplicate_labels: Rows superseded by a later label of the same request id.
        relabelled: Of those, the ones whose label differed from the one kept.
        labelled_requests: Distinct request ids labelled.
        prediction_objects: Prediction-log objects read.
        bad_prediction_objects: Objects that could not be read, with the reason.
        duplicate_predictions: Prediction records of an already seen request id (the first kept).
        unknown_request_ids: Labels matching no prediction of the model in the window (ignored).
        labelled_rows: Predictions joined with their label.
    """

    feedback_partitions: list[str] = field(default_factory=list)
    feedback_files: int = 0
    feedback_rows: int = 0
    invalid_feedback_rows: int = 0
    bad_feedback_files: list[str] = field(default_factory=list)
    duplicate_labels: int = 0
    relabelled: int = 0
    labelled_requests: int = 0
    prediction_objects: int = 0
    bad_prediction_objects: list[str] = field(default_factory=list)
    duplicate_predictions: int = 0
    unknown_request_ids: int = 0
    labelled_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_feedback(
    client: Any, raw_bucket: str, spec: DatasetSpec, days: list[str], counts: JoinCounts | None = None
) -> pd.DataFrame:
    """The valid feedback rows of the ``days`` partitions, in arrival order.

    Args:
        client: boto3 S3 client.
        raw_bucket: The raw bucket.
        spec: The dataset.
        days: ISO dates of the partitions to read.
        counts: Updated with files, rows and what was skipped.

    Returns:
        Columns ``request_id`` (str), ``true_label`` (the target's dtype), ``labelled_at``
        (UTC) and ``order`` (position in arrival order: day, file, row), one row per valid
        feedback row.
    """
    import pandas as pd

    shape = feedback_spec(spec)
    counts = counts if counts is not None else JoinCounts()
    frames = []
    for day in days:
        partition = feedback_partition(raw_bucket, spec, day)
        keys = [k for k in storage.list_keys(client, raw_bucket, partition.key) if k.endswith(".csv")]
        if keys:
            counts.feedback_partitions.append(partition.uri)
        for key in keys:
            uri = f"s3://{raw_bucket}/{key}"
            try:
                raw = pd.read_csv(
                    io.BytesIO(storage.get_bytes(client, storage.S3Location(raw_bucket, key))),
                    dtype=str,
                    keep_default_na=False,
                )
            except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError is a ValueError
                _bad(counts.bad_feedback_files, f"{uri}: not a readable CSV ({err})")
                continue
            missing = [c for c in shape.column_names if c not in raw.columns]
            if missing:
                _bad(counts.bad_feedback_files, f"{uri}: missing column(s) {missing}; expected {shape.column_names}")
                continue
            counts.feedback_files += 1
            frames.append(_valid_feedback(raw, shape, spec, uri, counts))
    if not frames:
        return pd.DataFrame(
            {
                "request_id": pd.Series(dtype=str),
                TRUE_LABEL: pd.Series(dtype=spec.target.dtype),
                LABELLED_AT: pd.Series(dtype="datetime64[ns, UTC]"),
                "order": pd.Series(dtype="int64"),
            }
        )
    feedback = pd.concat(frames, ignore_index=True)
    feedback["order"] = range(len(feedback))
    counts.feedback_rows = len(feedback)
    return feedback


def _valid_feedback(raw: pd.DataFrame, shape: FeedbackSpec, spec: DatasetSpec, uri: str, counts: JoinCounts) -> Any:
    import pandas as pd

    request_id = raw[shape.request_id_column].str.strip()
    label = pd.to_numeric(raw[shape.label_column].str.strip(), errors="coerce")
    labelled_at = pd.to_datetime(raw[shape.labelled_at_column].str.strip(), utc=True, errors="coerce", format="ISO8601")
    valid = (request_id != "") & label.isin(list(spec.target.allowed_values)) & labelled_at.notna()
    skipped = int((~valid).sum())
    if skipped:
        counts.invalid_feedback_rows += skipped
        log.warning(
            "%s: %d of %d feedback rows skipped (no request id, unknown label or bad time)", uri, skipped, len(raw)
        )
    return pd.DataFrame(
        {
            "request_id": request_id[valid].reset_index(drop=True),
            TRUE_LABEL: label[valid].astype(spec.target.dtype).reset_index(drop=True),
            LABELLED_AT: labelled_at[valid].reset_index(drop=True),
        }
    )


def _bad(where: list[str], message: str) -> None:
    log.warning("skipped %s", message)
    if len(where) < MAX_REPORTED_KEYS:
        where.append(message)


def latest_labels(feedback: pd.DataFrame, counts: JoinCounts | None = None) -> pd.DataFrame:
    """One label per request id: the latest ``labelled_at`` wins (ties: the later arrival).

    Args:
        feedback: ``read_feedback``'s frame.
        counts: Updated with ``duplicate_labels``, ``relabelled`` and ``labelled_requests``.

    Returns:
        ``request_id``, ``true_label``, ``labelled_at``, one row per request id.
    """
    counts = counts if counts is not None else JoinCounts()
    ordered = feedback.sort_values([LABELLED_AT, "order"], kind="stable")
    latest = ordered.drop_duplicates("request_id", keep="last")
    superseded = ordered.loc[~ordered.index.isin(latest.index)]
    kept_label = latest.set_index("request_id")[TRUE_LABEL]
    counts.duplicate_labels = len(superseded)
    counts.relabelled = int(
        (superseded[TRUE_LABEL].to_numpy() != kept_label.loc[superseded["request_id"]].to_numpy()).sum()
    )
    counts.labelled_requests = len(latest)
    return latest[["request_id", TRUE_LABEL, LABELLED_AT]].reset_index(drop=True)


# --- reading the prediction log ----------------------------------------------------------------


def log_schema(spec: DatasetSpec, with_features: bool) -> pa.Schema:
    """The prediction-log columns the join reads, with their types (features only when asked)."""
    import numpy as np
    import pyarrow as pa

    target = pa.from_numpy_dtype(np.dtype(spec.target.dtype))
    fields = [
        pa.field("request_id", pa.string()),
        pa.field("timestamp", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("label", target),
        pa.field("probability", pa.float64()),
        pa.field("source", pa.string()),
        pa.field("role", pa.string()),
        pa.field("shadow_model_version", pa.string()),
        pa.field("shadow_label", target),
        pa.field("shadow_probability", pa.float64()),
    ]
    if with_features:
        fields += [pa.field(c.name, pa.from_numpy_dtype(np.dtype(c.dtype))) for c in spec.features]
    return pa.schema(fields)


def read_log_object(body: bytes, key: str, schema: pa.Schema) -> pa.Table:
    """One prediction-log object as ``schema``: optional columns it lacks come back as nulls.

    Raises:
        ValueError: Not .jsonl/.parquet, or a required column is missing or of the wrong type.
    """
    import pyarrow as pa
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    required = [n for n in schema.names if n not in OPTIONAL_LOG_COLUMNS]
    if key.endswith(".parquet"):
        present = set(pq.read_schema(io.BytesIO(body)).names)
        table = pq.read_table(io.BytesIO(body), columns=[n for n in schema.names if n in present])
    elif key.endswith((".jsonl", ".json")):
        options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        table = pa_json.read_json(io.BytesIO(body), parse_options=options)
        # Arrow fills an absent field with nulls: a required one must actually be there.
        present = {n for n in table.column_names if table[n].null_count < table.num_rows or table.num_rows == 0}
        present |= set(OPTIONAL_LOG_COLUMNS)
    else:
        raise ValueError("not a prediction-log object (expected .parquet or .jsonl)")
    missing = [n for n in required if n not in present]
    if missing:
        raise ValueError(f"missing column(s) {missing}")
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema
    ]
    return pa.table(columns, schema=schema)


def log_keys(
    client: Any, bucket: str, model_name: str, start: dt.datetime, end: dt.datetime, prefix: str = PREDICTION_LOG_PREFIX
) -> list[str]:
    """Keys of the prediction-log hour partitions from ``start`` to ``end`` (exclusive), both layouts.

    One listing per day and layout (not per hour): a week back is 16 listings.
    """
    first = start.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    last = end.astimezone(dt.UTC) - dt.timedelta(microseconds=1)
    keys = []
    day = first.date()
    while day <= last.date():
        for base in (f"{prefix}/{model_name}/dt={day}/", f"{prefix}/dt={day}/"):
            for key in storage.list_keys(client, bucket, base):
                hour = _HOUR_PARTITION.search(key[len(prefix) :])
                if hour is None:
                    continue
                moment = dt.datetime.fromisoformat(f"{hour.group(1)}T{hour.group(2)}:00:00+00:00")
                if first <= moment <= last:
                    keys.append(key)
        day += dt.timedelta(days=1)
    return keys


def read_predictions(
    client: Any,
    bucket: str,
    model_name: str,
    spec: DatasetSpec,
    keys: list[str],
    request_ids: Any,
    *,
    with_features: bool = False,
    counts: JoinCounts | None = None,
) -> pd.DataFrame:
    """The prediction-log records of ``model_name`` whose request id is in ``request_ids``.

    Args:
        client: boto3 S3 client.
        bucket: The lake bucket.
        model_name: Registered model whose predictions are wanted (legacy partitions hold all).
        spec: The dataset (feature and label types).
        keys: Objects to read (``log_keys``).
        request_ids: The labelled request ids (any sequence of str).
        with_features: Also read the features (for training); the quality check does not.
        counts: Updated with objects read, bad objects and duplicate records.

    Returns:
        One row per request id (the earliest record of a repeated one), ``log_schema`` columns.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = counts if counts is not None else JoinCounts()
    schema = log_schema(spec, with_features)
    wanted = pa.array(list(request_ids), type=pa.string())
    tables = []
    for key in keys:
        try:
            table = read_log_object(storage.get_bytes(client, storage.S3Location(bucket, key)), key, schema)
        except (pa.ArrowException, ValueError) as err:
            _bad(counts.bad_prediction_objects, f"s3://{bucket}/{key}: {err}")
            continue
        counts.prediction_objects += 1
        keep = pc.and_(pc.equal(table["model_name"], model_name), pc.is_in(table["request_id"], value_set=wanted))
        tables.append(table.filter(pc.fill_null(keep, False)))
    frame = (pa.concat_tables(tables) if tables else schema.empty_table()).to_pandas()
    if len(frame):
        frame = frame.sort_values("timestamp", kind="stable", na_position="last")
    unique = frame.drop_duplicates("request_id", keep="first")
    counts.duplicate_predictions += len(frame) - len(unique)
    return unique.reset_index(drop=True)


# --- the join ----------------------------------------------------------------------------------


def join_labels(predictions: pd.DataFrame, labels: pd.DataFrame, counts: JoinCounts | None = None) -> pd.DataFrame:
    """Predictions with their latest label; labels of unknown request ids counted and dropped.

    Args:
        predictions: ``read_predictions``'s frame (one row per request id).
        labels: ``latest_labels``'s frame (one row per request id).
        counts: Updated with ``unknown_request_ids`` and ``labelled_rows``.

    Returns:
        The prediction columns plus ``true_label`` and ``labelled_at``.
    """
    counts = counts if counts is not None else JoinCounts()
    joined = predictions.merge(labels, on="request_id", how="inner", validate="one_to_one")
    counts.unknown_request_ids = len(labels) - len(joined)
    counts.labelled_rows = len(joined)
    return joined


def _moment(value: dt.datetime | str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        raise FeedbackError(f"{value!r} has no time zone; give UTC times (e.g. 2026-03-10T00:00:00+00:00)")
    return moment


@dataclass
class LabelledWindow:
    """The labelled predictions of a window and what the join counted."""

    frame: pd.DataFrame
    counts: JoinCounts


def labelled_window(
    client: Any,
    *,
    raw_bucket: str,
    lake_bucket: str,
    spec: DatasetSpec,
    model_name: str,
    feedback_days: list[str],
    predictions_from: dt.datetime | str,
    predictions_to: dt.datetime | str,
    with_features: bool = False,
    log_prefix: str = PREDICTION_LOG_PREFIX,
) -> LabelledWindow:
    """Read the feedback of ``feedback_days`` and join it with the predictions of the model.

    Args:
        client: boto3 S3 client.
        raw_bucket: Where the feedback drops land.
        lake_bucket: Where the prediction log is.
        spec: The dataset.
        model_name: Registered model whose predictions are labelled.
        feedback_days: Arrival days of the labels to use (``ds`` partitions).
        predictions_from: Oldest prediction-log hour a label may refer to (late labels); a
            datetime or its ISO string (as in a run's conf).
        predictions_to: End of the prediction-log window (exclusive), datetime or ISO string.
        with_features: Keep the features too (for a training frame).
        log_prefix: Key prefix of the prediction log.

    Returns:
        The joined frame (``read_predictions`` columns + ``true_label``, ``labelled_at``) and the counts.
    """
    counts = JoinCounts()
    labels = latest_labels(read_feedback(client, raw_bucket, spec, feedback_days, counts), counts)
    start, end = _moment(predictions_from), _moment(predictions_to)
    keys = log_keys(client, lake_bucket, model_name, start, end, log_prefix) if len(labels) else []
    predictions = read_predictions(
        client,
        lake_bucket,
        model_name,
        spec,
        keys,
        labels["request_id"],
        with_features=with_features,
        counts=counts,
    )
    joined = join_labels(predictions, labels, counts)
    log.info(
        "feedback %s: %d rows (%d duplicates, %d invalid) -> %d labelled predictions, %d unknown ids",
        feedback_days,
        counts.feedback_rows,
        counts.duplicate_labels,
        counts.invalid_feedback_rows,
        counts.labelled_rows,
        counts.unknown_request_ids,
    )
    return LabelledWindow(joined, counts)


# --- retraining on what was learned ------------------------------------------------------------


def training_frame(window: LabelledWindow, spec: DatasetSpec) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The labelled window as training rows: served inputs with their true labels.

    Args:
        window: ``labelled_window(..., with_features=True)``.
        spec: The dataset.

    Returns:
        The frame (the spec's columns and dtypes, one row per request id) and its lineage
        for the MLflow run: the feedback partitions, the counts of the join, and the rows.

    Raises:
        FeedbackError: The window was read without the features.
    """
    missing = [n for n in spec.feature_names if n not in window.frame.columns]
    if missing:
        raise FeedbackError(
            "the labelled window has no features: read it with labelled_window(..., with_features=True)"
        )
    # Already one row per request id (labels and predictions are both deduplicated); kept explicit.
    rows = window.frame.drop_duplicates("request_id")
    frame = rows[spec.feature_names].assign(**{spec.target.name: rows[TRUE_LABEL].to_numpy()})
    frame = frame[spec.column_names].astype(spec.dtypes).reset_index(drop=True)
    counts = window.counts
    lineage = {
        "feedback_partitions": list(counts.feedback_partitions),
        "feedback_files": counts.feedback_files,
        "feedback_rows": counts.feedback_rows,
        "duplicate_labels": counts.duplicate_labels,
        "unknown_request_ids": counts.unknown_request_ids,
        "invalid_feedback_rows": counts.invalid_feedback_rows,
        "training_rows": len(frame),
        "positive_share": float((frame[spec.target.name] == spec.positive_class).mean()) if len(frame) else None,
        "model_versions": sorted(rows["model_version"].dropna().unique().tolist()),
    }
    return frame, lineage


def feedback_training_frame(
    client: Any,
    *,
    raw_bucket: str,
    lake_bucket: str,
    spec: DatasetSpec,
    model_name: str,
    feedback_days: list[str],
    predictions_from: dt.datetime | str,
    predictions_to: dt.datetime | str,
    log_prefix: str = PREDICTION_LOG_PREFIX,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The labelled feedback window as a training frame, with its lineage (see ``training_frame``).

    The transform step of a quality-triggered run concatenates it with the newest labelled
    drop; the training run logs the lineage (feedback partitions and row counts). The
    keyword arguments after ``spec`` are exactly ``tasks.quality.retrain_conf``'s ``feedback``.
    """
    window = labelled_window(
        client,
        raw_bucket=raw_bucket,
        lake_bucket=lake_bucket,
        spec=spec,
        model_name=model_name,
        feedback_days=feedback_days,
        predictions_from=predictions_from,
        predictions_to=predictions_to,
        with_features=True,
        log_prefix=log_prefix,
    )
    return training_frame(window, spec)
