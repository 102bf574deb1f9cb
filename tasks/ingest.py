"""Ingestion: a day's raw CSV files become one immutable parquet snapshot.

Ingestion checks only what it must to build a table (each file is non-empty
UTF-8 CSV, the files of a day share one header, values parse as numbers);
everything about *content* (columns, allowed values, nulls, row count, label
balance) is Great Expectations' job in the validate step.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tasks import storage
from tasks.dataset_spec import DatasetSpec
from tasks.layout import DayLayout

log = logging.getLogger(__name__)


class DataRejected(ValueError):
    """The day's data cannot be accepted; not transient, retrying will not help.

    Attributes:
        reason: What is wrong and what to do, for the log and the quarantine note.
        files: Raw keys that caused the rejection (all files of the day when unknown).
    """

    def __init__(self, reason: str, files: list[str]):
        super().__init__(reason)
        self.reason = reason
        self.files = files


@dataclass
class IngestResult:
    snapshot_uri: str
    manifest_uri: str
    content_hash: str
    rows: int
    duplicate_rows: int
    dropped_duplicates: bool
    source_files: list[str] = field(default_factory=list)

    def as_xcom(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_csv(name: str, body: bytes) -> pd.DataFrame:
    if not body.strip():
        raise DataRejected(f"raw file {name} is empty ({len(body)} bytes); the upstream export wrote nothing", [name])
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataRejected(
            f"raw file {name} is not a UTF-8 text CSV (byte {err.start} is 0x{body[err.start]:02x}); "
            "check that upstream exports CSV, not a binary format",
            [name],
        ) from err
    header = text.splitlines()[0]
    if "," not in header:
        raise DataRejected(f"raw file {name} has no comma-separated header (first line: {header[:80]!r})", [name])
    try:
        # Everything as text first: numeric parsing is checked per column below, so the
        # error can name the column and the offending value.
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=True, skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as err:
        raise DataRejected(f"raw file {name} is not a well-formed CSV: {err}", [name]) from err


def coerce_to_spec(frame: pd.DataFrame, spec: DatasetSpec, source: str = "the drop") -> pd.DataFrame:
    """Parse the spec's columns to their dtypes; other columns stay as text for GX to reject.

    Args:
        frame: Raw frame with text columns.
        spec: Dataset spec naming dtypes.
        source: File name(s) for error messages.

    Returns:
        A frame with the same columns, spec columns coerced (nullable ints where nulls exist).

    Raises:
        DataRejected: A spec column holds a value that is not a number.
    """
    out = frame.copy()
    for column in spec.columns:
        if column.name not in out.columns:
            continue  # a missing column is reported by the GX column-list expectation
        raw = out[column.name]
        parsed = pd.to_numeric(raw, errors="coerce")
        bad = parsed.isna() & raw.notna()
        if bad.any():
            examples = sorted(set(raw[bad].astype(str)))[:5]
            raise DataRejected(
                f"column {column.name!r} in {source} must be numeric ({column.dtype}) but holds "
                f"{int(bad.sum())} non-numeric value(s), e.g. {examples}",
                [source],
            )
        infinite = parsed.isin([float("inf"), float("-inf")])
        if infinite.any():
            raise DataRejected(
                f"column {column.name!r} in {source} holds {int(infinite.sum())} infinite value(s); "
                "the export must write finite numbers (or leave the cell empty)",
                [source],
            )
        if column.is_integer:
            whole = parsed.dropna()
            if (whole != whole.round()).any():
                examples = sorted(set(whole[whole != whole.round()].tolist()))[:5]
                raise DataRejected(
                    f"column {column.name!r} in {source} must hold integers ({column.dtype}) but holds {examples}",
                    [source],
                )
            wide = parsed.astype("Int64")
            if wide.isna().any():
                out[column.name] = wide.astype(column.dtype.capitalize())
            else:
                # Out-of-range values must reach GX intact, so narrow only when they fit.
                info = pd.Series([0], dtype=column.dtype).dtype
                fits = wide.between(-(2 ** (8 * info.itemsize - 1)), 2 ** (8 * info.itemsize - 1) - 1).all()
                out[column.name] = wide.astype(column.dtype if fits else "int64")
        else:
            out[column.name] = parsed.astype(column.dtype)
    return out


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the table's content (columns, dtypes, values), independent of parquet encoding."""
    digest = hashlib.sha256()
    digest.update("|".join(f"{c}:{t}" for c, t in frame.dtypes.astype(str).items()).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def read_day(client: Any, layout: DayLayout) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Read every CSV of the day into one frame (files in key order).

    Returns:
        The concatenated frame and, per file, its key and row count.

    Raises:
        DataRejected: No file, an unreadable file, or files with different headers.
    """
    prefix = layout.raw_prefix
    keys = [k for k in storage.list_keys(client, prefix.bucket, prefix.key) if k.endswith(".csv")]
    if not keys:
        raise DataRejected(f"no CSV files under {prefix.uri}", [])
    frames, sources = [], []
    for key in keys:
        frame = _read_csv(key, storage.get_bytes(client, storage.S3Location(prefix.bucket, key)))
        if frames and list(frame.columns) != list(frames[0].columns):
            raise DataRejected(
                f"raw file {key} has columns {list(frame.columns)} but {sources[0]['key']} has "
                f"{list(frames[0].columns)}; all files of a day must share one header",
                [key],
            )
        frames.append(frame)
        sources.append({"key": key, "rows": len(frame)})
    return pd.concat(frames, ignore_index=True), sources


def ingest_day(client: Any, layout: DayLayout) -> IngestResult:
    """Build the day's snapshot and its manifest in the lake; rerunning a day overwrites both.

    Args:
        client: boto3 S3 client.
        layout: The day's S3 locations.

    Returns:
        URIs, content hash, row and duplicate counts of the snapshot.

    Raises:
        DataRejected: The raw files cannot form a table (see ``read_day`` and ``coerce_to_spec``).
    """
    spec = layout.spec
    raw, sources = read_day(client, layout)
    frame = coerce_to_spec(raw, spec, source=", ".join(s["key"] for s in sources))
    duplicate_rows = int(frame.duplicated().sum())
    if duplicate_rows:
        log.warning(
            "%s: %d exact duplicate rows (%.1f%%); %s",
            layout.ds,
            duplicate_rows,
            100 * duplicate_rows / max(len(frame), 1),
            "dropped (spec drop_duplicates: true)" if spec.drop_duplicates else "kept (spec drop_duplicates: false)",
        )
    if spec.drop_duplicates:
        frame = frame.drop_duplicates(ignore_index=True)
    digest = content_hash(frame)
    snapshot_uri = storage.write_parquet(client, layout.snapshot, frame, metadata={"content-sha256": digest})
    manifest = {
        "dataset": spec.name,
        "ds": layout.ds,
        "snapshot_uri": snapshot_uri,
        "content_sha256": digest,
        "rows": len(frame),
        "columns": list(frame.columns),
        "duplicate_rows": duplicate_rows,
        "dropped_duplicates": spec.drop_duplicates,
        "source_files": [{**s, "uri": f"s3://{layout.raw_prefix.bucket}/{s['key']}"} for s in sources],
    }
    manifest_uri = storage.put_json(client, layout.snapshot_manifest, manifest)
    log.info("snapshot %s: %d rows, sha256 %s", snapshot_uri, len(frame), digest)
    return IngestResult(
        snapshot_uri=snapshot_uri,
        manifest_uri=manifest_uri,
        content_hash=digest,
        rows=len(frame),
        duplicate_rows=duplicate_rows,
        dropped_duplicates=spec.drop_duplicates,
        source_files=[m["uri"] for m in manifest["source_files"]],
    )
