"""Ingestion: a day's raw CSV files become one immutable parquet snapshot.

Ingestion checks only what it must to build a table (each file is non-empty
UTF-8 CSV, the files of a day share one header, values parse as numbers, the drop
stays within the spec's ``limits``); everything about *content* (columns, allowed
values, nulls, row count, label balance) is Great Expectations' job in the validate step.

Memory is bounded whatever lands in the bucket: file sizes come from the listing
before anything is read, each header from a ranged GET of the file's first bytes,
and the body is streamed through pyarrow's CSV reader block by block, typed by the
spec, into one compact table (1 byte a cell for an ``int8`` column). A drop over a
limit is rejected with ``DataRejected`` (and quarantined by the caller), never
read into memory first.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tasks import storage
from tasks.dataset_spec import PROJECT_ROOT, ColumnSpec, DatasetSpec
from tasks.layout import DayLayout

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# The header is looked for in the file's first HEAD_BYTES; a longer header line is read
# up to HEADER_BYTES_PER_COLUMN per allowed column (limits.max_columns), never further.
HEAD_BYTES = 64 * 1024
HEADER_BYTES_PER_COLUMN = 256
# pyarrow parses the body in blocks of this size; one CSV row must fit in a block.
# (1 MiB: 14,000 rows of network_security a block; bigger blocks only add read-ahead memory.)
BLOCK_BYTES = 1024 * 1024
# What pandas' read_csv reads as missing by default (keep_default_na=True); the
# snapshot must not depend on which reader parsed the file.
NA_VALUES = (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
)
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes
_EXAMPLES = 5
HASH_ROWS = 1_000_000


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


@dataclass(frozen=True)
class RawFile:
    """One raw CSV of the day, with its size from the listing."""

    key: str
    size: int


# --- value checks (shared by the streaming reader and coerce_to_spec) -----------------------


@dataclass
class _Findings:
    """What is wrong with one spec column of one source, counted over all of it."""

    non_numeric: int = 0
    non_numeric_examples: list[str] = field(default_factory=list)
    infinite: int = 0
    non_integer_examples: list[float] = field(default_factory=list)
    out_of_int64: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.non_numeric or self.infinite or self.non_integer_examples or self.out_of_int64)

    def add(self, raw: pd.Series, parsed: pd.Series, column: ColumnSpec) -> None:
        bad = parsed.isna() & raw.notna()
        if bad.any():
            self.non_numeric += int(bad.sum())
            self.non_numeric_examples = _smallest(self.non_numeric_examples, raw[bad].astype(str))
        self.infinite += int(parsed.isin([math.inf, -math.inf]).sum())
        if column.is_integer:
            whole = parsed.dropna()
            fractional = whole[whole != whole.round()]
            if len(fractional):
                self.non_integer_examples = _smallest(self.non_integer_examples, fractional.tolist())

    def raise_first(self, column: ColumnSpec, source: str) -> None:
        """Raise the rejection of today's reader for the first problem found (in this order)."""
        if self.non_numeric:
            raise DataRejected(
                f"column {column.name!r} in {source} must be numeric ({column.dtype}) but holds "
                f"{self.non_numeric} non-numeric value(s), e.g. {self.non_numeric_examples}",
                [source],
            )
        if self.infinite:
            raise DataRejected(
                f"column {column.name!r} in {source} holds {self.infinite} infinite value(s); "
                "the export must write finite numbers (or leave the cell empty)",
                [source],
            )
        if self.non_integer_examples:
            raise DataRejected(
                f"column {column.name!r} in {source} must hold integers ({column.dtype}) "
                f"but holds {self.non_integer_examples}",
                [source],
            )
        if self.out_of_int64:
            raise DataRejected(
                f"column {column.name!r} in {source} holds integers outside the int64 range, "
                f"e.g. {self.out_of_int64}; the export must write {column.dtype} values",
                [source],
            )


def _smallest(kept: list, new: Any) -> list:
    """The ``_EXAMPLES`` smallest distinct values of ``kept`` and ``new`` (the examples a message shows)."""
    return sorted(set(kept) | set(new))[:_EXAMPLES]


def _integer_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def coerce_to_spec(frame: pd.DataFrame, spec: DatasetSpec, source: str = "the drop") -> pd.DataFrame:
    """Parse the spec's columns to their dtypes; other columns stay as text for GX to reject.

    The frame-at-once form of what ``read_day`` does while streaming, with the same rules
    and messages (for frames built in memory, e.g. by tests and tools).

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
        findings = _Findings()
        findings.add(raw, parsed, column)
        findings.raise_first(column, source)
        if column.is_integer:
            wide = parsed.astype("Int64")
            low, high = _integer_range(column.dtype)
            # Out-of-range values must reach GX intact, so narrow only when they fit.
            fits = bool(wide.dropna().between(low, high).all())
            target = column.dtype if fits else "int64"
            out[column.name] = wide.astype(target.capitalize() if wide.isna().any() else target)
        else:
            out[column.name] = parsed.astype(column.dtype)
    return out


# --- the day's files: sizes and headers, before any body is read ----------------------------


def _spec_file(spec: DatasetSpec) -> str:
    """Where the spec's limits are raised: its file, relative to the project when inside it."""
    if spec.source_file is None:
        return f"include/datasets/{spec.name}.yaml"
    try:
        return str(spec.source_file.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(spec.source_file)


def list_raw_files(client: Any, layout: DayLayout) -> list[RawFile]:
    """The day's CSV files in key order, each within ``limits.max_file_bytes`` (from the listing).

    Raises:
        DataRejected: No CSV file, or one larger than the limit (nothing has been read yet).
    """
    prefix = layout.raw_prefix
    files = [
        RawFile(k, size) for k, size in storage.list_sizes(client, prefix.bucket, prefix.key) if k.endswith(".csv")
    ]
    if not files:
        raise DataRejected(f"no CSV files under {prefix.uri}", [])
    limit = layout.spec.limits.max_file_bytes
    for raw in files:
        if raw.size > limit:
            raise DataRejected(
                f"raw file {raw.key} is {raw.size:,} bytes, over limits.max_file_bytes = {limit:,} of dataset "
                f"{layout.spec.name!r}; have the export write several smaller files under the same ds, or raise "
                f"limits.max_file_bytes in {_spec_file(layout.spec)} if the workers have the memory",
                [raw.key],
            )
    return files


def _not_utf8(key: str, err: UnicodeDecodeError, offset: int, data: bytes) -> DataRejected:
    return DataRejected(
        f"raw file {key} is not a UTF-8 text CSV (byte {offset + err.start} is 0x{data[err.start]:02x}); "
        "check that upstream exports CSV, not a binary format",
        [key],
    )


def _empty(key: str, size: int) -> DataRejected:
    return DataRejected(f"raw file {key} is empty ({size} bytes); the upstream export wrote nothing", [key])


def _is_blank(client: Any, location: storage.S3Location) -> bool:
    """Whether the object holds only whitespace, read in blocks (it stops at the first other byte)."""
    body = storage.open_stream(client, location)
    try:
        while chunk := body.read(BLOCK_BYTES):
            if chunk.strip(_WHITESPACE):
                return False
        return True
    finally:
        body.close()


def _column_names(fields: list[str]) -> list[str]:
    """Header fields as pandas' read_csv names them: blanks ``Unnamed: i``, repeats ``name.1``, ..."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(fields):
        name = name or f"Unnamed: {i}"
        base = name
        while name in seen:
            seen[base] += 1
            name = f"{base}.{seen[base]}"
        seen.setdefault(name, 0)
        names.append(name)
    return names


def _head(client: Any, location: storage.S3Location, raw: RawFile, length: int) -> bytes:
    """The file's first ``length`` bytes (a ranged GET), checked to be UTF-8."""
    head = storage.get_range(client, location, 0, min(raw.size, length))
    try:
        # A multi-byte character cut by the range's end is not an error (final=False).
        codecs.utf_8_decode(head, "strict", len(head) >= raw.size)
    except UnicodeDecodeError as err:
        raise _not_utf8(raw.key, err, 0, head) from err
    return head


def read_header(client: Any, bucket: str, raw: RawFile, spec: DatasetSpec) -> list[str]:
    """The file's column names, from its first bytes (a ranged GET), within ``limits.max_columns``.

    Raises:
        DataRejected: The file is empty, not UTF-8, has no comma-separated first line, or a
            header over the column limit (or too long to be one).
    """
    location = storage.S3Location(bucket, raw.key)
    if raw.size == 0:
        raise _empty(raw.key, 0)
    limit = spec.limits.max_columns
    head = _head(client, location, raw, HEAD_BYTES)
    if not head.strip(_WHITESPACE) and (len(head) >= raw.size or _is_blank(client, location)):
        raise _empty(raw.key, raw.size)
    newline = head.find(b"\n")
    if newline < 0 and raw.size > len(head):
        head = _head(client, location, raw, max(HEAD_BYTES, limit * HEADER_BYTES_PER_COLUMN))
        newline = head.find(b"\n")
        if newline < 0 and raw.size > len(head):
            raise DataRejected(
                f"raw file {raw.key} has no line break in its first {len(head):,} bytes: a header longer than "
                f"limits.max_columns = {limit:,} columns allow for dataset {spec.name!r}; check the export's line "
                f"endings and delimiter, or raise limits.max_columns in {_spec_file(spec)}",
                [raw.key],
            )
    line = (head[:newline] if newline >= 0 else head).decode("utf-8").rstrip("\r")
    if "," not in line:
        raise DataRejected(f"raw file {raw.key} has no comma-separated header (first line: {line[:80]!r})", [raw.key])
    try:
        fields = next(csv.reader([line], skipinitialspace=True))
    except csv.Error as err:
        raise DataRejected(f"raw file {raw.key} is not a well-formed CSV: header: {err}", [raw.key]) from err
    if len(fields) > limit:
        raise DataRejected(
            f"raw file {raw.key} has {len(fields):,} columns, over limits.max_columns = {limit:,} of dataset "
            f"{spec.name!r} (the spec has {len(spec.columns)}); export only the spec's columns, or raise "
            f"limits.max_columns in {_spec_file(spec)}",
            [raw.key],
        )
    return _column_names(fields)


# --- the body, streamed ----------------------------------------------------------------------


class _Utf8Stream:
    """A read-only file over an S3 body that checks UTF-8 and the listed size as pyarrow reads it.

    pyarrow checks UTF-8 only in text columns, so a binary file would otherwise surface
    as a number-parsing error far from its cause. A problem is kept in ``problem`` (an
    exception raised inside pyarrow's reader thread reaches us wrapped).
    """

    def __init__(self, body: Any, key: str, listed_bytes: int):
        self.body, self.key, self.listed_bytes = body, key, listed_bytes
        self.offset = 0
        self.pending = b""
        self.problem: DataRejected | None = None
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        chunk = self.body.read(BLOCK_BYTES if size is None or size < 0 else size)
        if self.pending or not chunk.isascii():  # ASCII is UTF-8: no decoding (and no copy) needed
            data = self.pending + chunk
            try:
                _, used = codecs.utf_8_decode(data, "strict", not chunk)
            except UnicodeDecodeError as err:
                self.problem = _not_utf8(self.key, err, self.offset - len(self.pending), data)
                raise self.problem from err
            self.pending = data[used:]
        self.offset += len(chunk)
        if self.offset > self.listed_bytes:
            # The size limit and the table's allocation were decided on the listed size.
            self.problem = DataRejected(
                f"raw file {self.key} changed while it was read: listed at {self.listed_bytes:,} bytes, more "
                "were read; the export must not rewrite files after the drop is published (rerun the day)",
                [self.key],
            )
            raise self.problem
        return chunk

    def close(self) -> None:
        self.closed = True
        self.body.close()


def _csv_batches(
    client: Any, bucket: str, raw: RawFile, names: list[str], spec: DatasetSpec, typed: bool
) -> Iterator[pa.RecordBatch]:
    """The file's rows in record batches; spec columns typed (int64/float64) or all as text."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    dtypes = spec.dtypes
    types = {
        name: (pa.int64() if dtypes[name].startswith("int") else pa.float64())
        if typed and name in dtypes
        else pa.string()
        for name in names
    }
    stream = _Utf8Stream(storage.open_stream(client, storage.S3Location(bucket, raw.key)), raw.key, raw.size)
    try:
        reader = pacsv.open_csv(
            pa.PythonFile(stream, mode="r"),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=BLOCK_BYTES),
            convert_options=pacsv.ConvertOptions(
                column_types=types, null_values=list(NA_VALUES), strings_can_be_null=True
            ),
        )
        try:
            yield from reader
        finally:
            reader.close()  # stops its read-ahead before the stream under it closes
    except Exception:
        if stream.problem is not None:
            raise stream.problem from None
        raise
    finally:
        stream.close()


class _Column:
    """One spec column of the day, in one numpy buffer at its final dtype.

    The buffer is allocated once for the most rows the day's files can hold (their sizes
    from the listing, at least one byte a cell, and never more than ``limits.max_rows``):
    untouched pages cost no memory, and batches are copied straight in, so the column
    exists once, at 1 byte a cell for ``int8``, with no chunks to concatenate and no
    reallocation to fragment the heap. An integer column gets a null mask only once a
    null arrives, and becomes int64 only if a value does not fit its dtype (narrowed back
    at the end when the values that forced it were rolled back).
    """

    def __init__(self, spec: ColumnSpec, capacity: int):
        self.spec = spec
        self.values = np.empty(capacity, dtype=spec.dtype)
        self.mask: np.ndarray | None = None
        self.rows = 0

    @property
    def nbytes(self) -> int:
        return self.rows * (self.values.itemsize + (1 if self.mask is not None else 0))

    def _reserve(self, rows: int) -> None:
        if rows <= len(self.values):
            return
        capacity = max(rows, len(self.values) + len(self.values) // 2, 4096)  # only if the bound was wrong
        self.values.resize(capacity, refcheck=False)  # never viewed before finish()
        if self.mask is not None:
            self.mask.resize(capacity, refcheck=False)

    def append(self, array: pa.Array) -> None:
        import pyarrow.compute as pc

        count = len(array)
        self._reserve(self.rows + count)
        at = slice(self.rows, self.rows + count)
        if self.spec.is_integer:
            if array.null_count:
                if self.mask is None:
                    self.mask = np.zeros(len(self.values), dtype=bool)
                self.mask[at] = array.is_null().to_numpy(zero_copy_only=False)
                array = array.fill_null(0)
            elif self.mask is not None:
                self.mask[at] = False
            bounds = pc.min_max(array).as_py()
            low, high = _integer_range(self.values.dtype.name)
            if bounds["min"] is not None and not low <= bounds["min"] <= bounds["max"] <= high:
                # Out-of-range values must reach GX intact: the column becomes int64.
                self.values = self.values.astype(np.int64)
        self.values[at] = array.to_numpy(zero_copy_only=False)
        self.rows += count

    def finish(self) -> Any:
        """The column for pandas: numpy at the spec's dtype (int64 if needed), nullable if it holds nulls."""
        self.values.resize(self.rows, refcheck=False)
        values = self.values
        if self.mask is not None:
            self.mask.resize(self.rows, refcheck=False)
        nullable = self.mask is not None and bool(self.mask.any())
        if values.dtype != self.spec.dtype and self.spec.is_integer:
            low, high = _integer_range(self.spec.dtype)
            kept = values[~self.mask] if nullable else values
            if not len(kept) or (low <= kept.min() and kept.max() <= high):
                values = values.astype(self.spec.dtype)
        if nullable:
            return pd.arrays.IntegerArray(values, self.mask)
        return values


class _DayTable:
    """The day's columns (spec columns in ``_Column`` buffers, others as Arrow text chunks) and their limits."""

    def __init__(self, spec: DatasetSpec, names: list[str], layout: DayLayout, files: list[RawFile]):
        self.spec, self.names, self.layout = spec, names, layout
        self.columns = {c.name: c for c in spec.columns if c.name in names}
        # A row of n fields takes at least n bytes (n - 1 commas and a line break).
        capacity = min(spec.limits.max_rows, sum(raw.size // len(names) + 1 for raw in files))
        self.buffers = {name: _Column(column, capacity) for name, column in self.columns.items()}
        self.text: dict[str, list[pa.Array]] = {name: [] for name in names if name not in self.columns}
        self.rows = 0
        self.text_bytes = 0

    @property
    def nbytes(self) -> int:
        return self.text_bytes + sum(buffer.nbytes for buffer in self.buffers.values())

    def checkpoint(self) -> tuple[int, int, dict[str, int]]:
        return self.rows, self.text_bytes, {name: len(chunks) for name, chunks in self.text.items()}

    def rollback(self, point: tuple[int, int, dict[str, int]]) -> None:
        """Forget what was added since ``point`` (a file about to be read again)."""
        self.rows, self.text_bytes, counts = point
        for buffer in self.buffers.values():
            buffer.rows = self.rows
        for name, count in counts.items():
            del self.text[name][count:]

    def add(self, columns: dict[str, pa.Array], rows: int, key: str) -> None:
        """Keep one batch (spec columns as int64/float64, others as text), checking the day's limits."""
        limits = self.spec.limits
        self.rows += rows
        if self.rows > limits.max_rows:
            raise DataRejected(
                f"the drop of ds={self.layout.ds} holds more than limits.max_rows = {limits.max_rows:,} rows of "
                f"dataset {self.spec.name!r} ({self.rows:,} read by the end of a block of {key}); have the export "
                f"deliver at most {limits.max_rows:,} rows a day, or raise limits.max_rows in "
                f"{_spec_file(self.spec)} if the workers have the memory",
                [],
            )
        for name, array in columns.items():
            if name in self.buffers:
                self.buffers[name].append(array)
            else:
                self.text[name].append(array)
                self.text_bytes += array.nbytes
        if self.nbytes > limits.max_table_bytes:
            raise DataRejected(
                f"the drop of ds={self.layout.ds} needs more than limits.max_table_bytes = "
                f"{limits.max_table_bytes:,} bytes of memory as a typed table ({self.nbytes:,} bytes for "
                f"{self.rows:,} rows of {len(self.names)} columns by the end of a block of {key}); columns "
                f"outside the spec are held as text: export only the spec's columns and at most that much a day, "
                f"or raise limits.max_table_bytes in {_spec_file(self.spec)} if the workers have the memory",
                [],
            )

    def to_frame(self) -> pd.DataFrame:
        """The typed frame over the buffers themselves (no copy of a numeric column)."""
        import pyarrow as pa

        data: dict[str, Any] = {}
        for name in self.names:
            if name in self.buffers:
                data[name] = self.buffers.pop(name).finish()
            else:
                chunks = pa.chunked_array(self.text.pop(name), type=pa.string())
                data[name] = pd.StringDtype("pyarrow").__from_arrow__(chunks)
        # copy=False: no consolidation into one 2-D block (a second copy of the whole table).
        return pd.DataFrame(data, copy=False)


def _text_batch_columns(
    batch: pa.RecordBatch, columns: dict[str, ColumnSpec], findings: dict[str, _Findings]
) -> dict[str, pa.Array]:
    """Spec columns of an all-text batch parsed as pandas would, problems counted in ``findings``."""
    import pyarrow as pa

    out: dict[str, pa.Array] = {}
    for name, array in zip(batch.schema.names, batch.columns, strict=True):
        column = columns.get(name)
        if column is None:
            out[name] = array
            continue
        # As read_csv(skipinitialspace=True) sees the cell: leading blanks off, then NA strings.
        raw = array.to_pandas().str.lstrip(" ")
        raw = raw.where(~raw.isin(NA_VALUES), None)
        parsed = pd.to_numeric(raw, errors="coerce")
        found = findings[name]
        found.add(raw, parsed, column)
        if found:
            continue  # the file is rejected at its end; keep counting, keep nothing
        if column.is_integer:
            try:
                with np.errstate(invalid="ignore"):  # a value beyond int64 is reported, not warned about
                    out[name] = pa.array(parsed.astype("Int64"), type=pa.int64())
            except (OverflowError, TypeError, ValueError):
                outside = (parsed < -(2**63)) | (parsed > 2**63 - 1)
                found.out_of_int64 = _smallest(found.out_of_int64, raw[outside].astype(str)) or ["?"]
        else:
            out[name] = pa.array(parsed.astype("float64").to_numpy(), type=pa.float64())
    return out


def _read_file(client: Any, bucket: str, raw: RawFile, names: list[str], table: _DayTable) -> int:
    """Stream one file into ``table``; returns its row count.

    The fast path lets pyarrow parse the spec columns as numbers. If a value does not
    parse, the file is read again as text and parsed as pandas would, which either
    accepts it (e.g. ``3.0`` in an integer column) or names every bad value.
    """
    import pyarrow as pa

    columns = table.columns
    for typed in (True, False):
        start = table.checkpoint()
        findings = {name: _Findings() for name in columns}
        try:
            for batch in _csv_batches(client, bucket, raw, names, table.spec, typed):
                if typed:
                    arrays = dict(zip(batch.schema.names, batch.columns, strict=True))
                    for name, column in columns.items():
                        if not column.is_integer:
                            findings[name].infinite += _count_infinite(arrays[name])
                else:
                    arrays = _text_batch_columns(batch, columns, findings)
                if any(findings.values()):
                    continue  # rejected at the end of the file, with every bad value counted
                table.add(arrays, batch.num_rows, raw.key)
        except pa.ArrowInvalid as err:
            if typed and "conversion error" in str(err):
                table.rollback(start)  # and read the file again as text
                continue
            raise DataRejected(f"raw file {raw.key} is not a well-formed CSV: {err}", [raw.key]) from err
        for name, column in columns.items():
            findings[name].raise_first(column, raw.key)
        return table.rows - start[0]
    raise AssertionError("unreachable: the text pass either returns or raises")


def _count_infinite(array: pa.Array) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.is_inf(array)).as_py() or 0)


def read_day(client: Any, layout: DayLayout) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Read every CSV of the day into one typed frame (files in key order), within the spec's limits.

    Returns:
        The concatenated frame (spec columns at their dtypes, others as text) and, per
        file, its key and row count.

    Raises:
        DataRejected: No file, an unreadable file, files with different headers, a value
            that is not a number, or a drop over one of the spec's ``limits``.
    """
    import pyarrow as pa

    bucket = layout.raw_prefix.bucket
    files = list_raw_files(client, layout)
    table: _DayTable | None = None
    sources: list[dict[str, Any]] = []
    for raw in files:
        header = read_header(client, bucket, raw, layout.spec)
        if table is None:
            table = _DayTable(layout.spec, header, layout, files)
        elif header != table.names:
            try:  # an unreadable file is reported as such, before its header
                for _ in _csv_batches(client, bucket, raw, header, layout.spec, typed=False):
                    pass
            except pa.ArrowInvalid as err:
                raise DataRejected(f"raw file {raw.key} is not a well-formed CSV: {err}", [raw.key]) from err
            raise DataRejected(
                f"raw file {raw.key} has columns {header} but {files[0].key} has "
                f"{table.names}; all files of a day must share one header",
                [raw.key],
            )
        sources.append({"key": raw.key, "rows": _read_file(client, bucket, raw, header, table)})
    assert table is not None  # list_raw_files returns at least one file
    return table.to_frame(), sources


# --- duplicates, hash, snapshot ----------------------------------------------------------------


def duplicate_mask(frame: pd.DataFrame) -> np.ndarray:
    """``frame.duplicated()`` (later repeats of a row marked), exactly, in O(rows) memory.

    pandas' own ``duplicated`` holds one int64 code array per column at once (8 bytes a
    cell: 1.2 GB for 5M rows of 31 int8 columns). Here each row gets one int64 code, the
    mixed-radix number of its per-column value codes, re-densified before it could
    overflow; equal codes are equal rows. A stable sort then marks every occurrence but
    the first of each code.
    """
    rows = len(frame)
    codes = np.zeros(rows, dtype=np.int64)
    bound = 1  # codes < bound
    for name in frame.columns:
        column_codes, uniques = pd.factorize(frame[name], use_na_sentinel=False)
        if len(uniques) == rows:  # a column of distinct values: no two rows are equal
            return np.zeros(rows, dtype=bool)
        radix = max(len(uniques), 1)
        if bound * radix >= 2**62:
            codes, distinct = pd.factorize(codes)
            bound = max(len(distinct), 1)  # <= rows, so bound * radix <= rows**2 stays in range
        codes *= radix
        codes += column_codes
        bound *= radix
        del column_codes, uniques
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    del codes
    first = np.empty(rows, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    del ordered
    duplicated = np.ones(rows, dtype=bool)
    duplicated[order[first]] = False
    return duplicated


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the table's content (columns, dtypes, values), independent of parquet encoding.

    The row hashes are fed to the digest ``HASH_ROWS`` rows at a time: a row's hash does
    not depend on the other rows, so the digest is the one of the whole frame at once,
    without pandas' temporaries for every row (several 8-byte arrays of the frame's length).
    """
    digest = hashlib.sha256()
    digest.update("|".join(f"{c}:{t}" for c, t in frame.dtypes.astype(str).items()).encode())
    for start in range(0, len(frame), HASH_ROWS):
        rows = frame.iloc[start : start + HASH_ROWS]
        digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def ingest_day(client: Any, layout: DayLayout) -> IngestResult:
    """Build the day's snapshot and its manifest in the lake; rerunning a day overwrites both.

    Args:
        client: boto3 S3 client.
        layout: The day's S3 locations.

    Returns:
        URIs, content hash, row and duplicate counts of the snapshot.

    Raises:
        DataRejected: The raw files cannot form a table or break a limit (see ``read_day``).
    """
    spec = layout.spec
    frame, sources = read_day(client, layout)
    duplicated = duplicate_mask(frame)
    duplicate_rows = int(duplicated.sum())
    if duplicate_rows:
        log.warning(
            "%s: %d exact duplicate rows (%.1f%%); %s",
            layout.ds,
            duplicate_rows,
            100 * duplicate_rows / max(len(frame), 1),
            "dropped (spec drop_duplicates: true)" if spec.drop_duplicates else "kept (spec drop_duplicates: false)",
        )
    if spec.drop_duplicates and duplicate_rows:
        frame = frame.loc[~duplicated].reset_index(drop=True)
    del duplicated
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
