"""Ingestion: raw CSV parts become one typed snapshot; unreadable or oversized drops are rejected by name."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks import ingest, storage
from tasks.config import Settings
from tasks.datagen import generate, publish_drop, to_csv_parts
from tasks.dataset_spec import DatasetSpec, IngestLimits
from tasks.ingest import DataRejected, coerce_to_spec, content_hash, ingest_day
from tasks.layout import DayLayout
from tasks.validate import quarantine_drop

DS = "2026-01-05"


def as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as ingestion first reads it: every column as text."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    buffer.seek(0)
    return pd.read_csv(buffer, dtype=str)


def put_parts(client: Any, layout: DayLayout, bodies: list[bytes]) -> list[str]:
    """Drop raw files under the day's landing prefix; returns their keys."""
    keys = []
    for i, body in enumerate(bodies):
        location = layout.raw_prefix.child(f"part-{i:04d}.csv")
        storage.put_bytes(client, location, body)
        keys.append(location.key)
    return keys


def header(spec: DatasetSpec) -> bytes:
    return (",".join(spec.column_names) + "\n").encode()


@pytest.fixture
def layout(settings: Settings, network_spec: DatasetSpec) -> DayLayout:
    return DayLayout(settings, network_spec, DS)


# --- coerce_to_spec -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["network_spec", "flows_spec"])
def test_coerce_turns_text_into_spec_dtypes(request: pytest.FixtureRequest, name: str) -> None:
    spec: DatasetSpec = request.getfixturevalue(name)
    frame = generate(spec, 200, seed=1)
    text = as_text(frame)
    assert set(text.dtypes.astype(str)) == {"object"}
    coerced = coerce_to_spec(text, spec)
    assert coerced.dtypes.astype(str).to_dict() == spec.dtypes
    pd.testing.assert_frame_equal(coerced, frame)


def test_coerce_does_not_modify_its_input(network_spec: DatasetSpec) -> None:
    text = as_text(generate(network_spec, 20, seed=1))
    before = text.copy()
    coerce_to_spec(text, network_spec)
    pd.testing.assert_frame_equal(text, before)


def test_non_numeric_value_rejected_naming_column_and_value(network_spec: DatasetSpec) -> None:
    text = as_text(generate(network_spec, 20, seed=1))
    text.loc[3, "SFH"] = "abc"
    with pytest.raises(DataRejected) as err:
        coerce_to_spec(text, network_spec, source="raw/part-0001.csv")
    assert "'SFH'" in err.value.reason
    assert "abc" in err.value.reason
    assert "raw/part-0001.csv" in err.value.reason
    assert err.value.files == ["raw/part-0001.csv"]


def test_non_integer_in_int_column_rejected(flows_spec: DatasetSpec) -> None:
    text = as_text(generate(flows_spec, 20, seed=1))
    text.loc[0, "distinct_ports"] = "1.5"
    with pytest.raises(DataRejected) as err:
        coerce_to_spec(text, flows_spec)
    assert "'distinct_ports'" in str(err.value)
    assert "1.5" in str(err.value)


def test_float_written_integer_accepted_in_int_column(flows_spec: DatasetSpec) -> None:
    """``3.0`` is a whole number: accepted and stored as the integer 3."""
    text = as_text(generate(flows_spec, 20, seed=1))
    text.loc[0, "distinct_ports"] = "3.0"
    coerced = coerce_to_spec(text, flows_spec)
    assert coerced["distinct_ports"].dtype == "int32"
    assert coerced.loc[0, "distinct_ports"] == 3


@pytest.mark.parametrize(
    ("value", "dtype"),
    [("2", "int8"), ("-5", "int8"), ("300", "int64")],  # 300 does not fit int8: widened, not wrapped
)
def test_value_outside_allowed_set_is_left_for_gx(network_spec: DatasetSpec, value: str, dtype: str) -> None:
    """Ingestion only parses; an allowed-set violation reaches GX as the number it is."""
    text = as_text(generate(network_spec, 20, seed=1))
    text.loc[4, "Favicon"] = value
    coerced = coerce_to_spec(text, network_spec)
    assert str(coerced["Favicon"].dtype) == dtype
    assert coerced.loc[4, "Favicon"] == int(value)
    assert coerced["Result"].dtype == "int8"


def test_missing_column_left_missing(network_spec: DatasetSpec) -> None:
    text = as_text(generate(network_spec, 20, seed=1)).drop(columns=["port"])
    coerced = coerce_to_spec(text, network_spec)
    assert "port" not in coerced.columns
    assert list(coerced.columns) == [c for c in network_spec.column_names if c != "port"]
    assert coerced["Favicon"].dtype == "int8"


def test_extra_column_kept_as_text(network_spec: DatasetSpec) -> None:
    text = as_text(generate(network_spec, 20, seed=1)).assign(comment="x")
    coerced = coerce_to_spec(text, network_spec)
    assert coerced["comment"].tolist() == ["x"] * 20


def test_nulls_in_int_column_become_nullable_int(network_spec: DatasetSpec) -> None:
    """Nulls are not rejected at ingestion; the nullable dtype lets GX's null check report them."""
    text = as_text(generate(network_spec, 20, seed=1))
    text.loc[2, "Iframe"] = None
    coerced = coerce_to_spec(text, network_spec)
    assert str(coerced["Iframe"].dtype) == "Int8"
    assert int(coerced["Iframe"].isna().sum()) == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_infinite_value_in_int_column_rejected(flows_spec: DatasetSpec, value: str) -> None:
    text = as_text(generate(flows_spec, 20, seed=1))
    text.loc[0, "distinct_ports"] = value
    with pytest.raises(DataRejected, match="distinct_ports"):
        coerce_to_spec(text, flows_spec)


# --- ingest_day -------------------------------------------------------------------------------


def test_ingest_multi_file_day(buckets: Any, layout: DayLayout, network_spec: DatasetSpec) -> None:
    uris = publish_drop(buckets, layout, rows=600, seed=3, parts=3)
    assert len(uris) == 3
    result = ingest_day(buckets, layout)

    assert result.rows == 600
    assert result.snapshot_uri == layout.snapshot.uri
    assert result.source_files == uris
    manifest = storage.get_json(buckets, layout.snapshot_manifest)
    assert [s["uri"] for s in manifest["source_files"]] == uris
    assert sum(s["rows"] for s in manifest["source_files"]) == manifest["rows"] == 600
    assert manifest["content_sha256"] == result.content_hash
    assert manifest["columns"] == network_spec.column_names

    snapshot = storage.read_parquet(buckets, layout.snapshot)
    assert snapshot.dtypes.astype(str).to_dict() == network_spec.dtypes
    pd.testing.assert_frame_equal(snapshot, generate(network_spec, 600, seed=3))
    assert content_hash(snapshot) == result.content_hash
    head = buckets.head_object(Bucket=layout.snapshot.bucket, Key=layout.snapshot.key)
    assert head["Metadata"]["content-sha256"] == result.content_hash


def test_ingest_numeric_dataset(buckets: Any, settings: Settings, flows_spec: DatasetSpec) -> None:
    layout = DayLayout(settings, flows_spec, DS)
    publish_drop(buckets, layout, rows=300, seed=3, parts=2)
    result = ingest_day(buckets, layout)
    snapshot = storage.read_parquet(buckets, layout.snapshot)
    assert len(snapshot) == result.rows
    assert snapshot.dtypes.astype(str).to_dict() == flows_spec.dtypes


@pytest.fixture
def frame_with_duplicates(network_spec: DatasetSpec) -> tuple[pd.DataFrame, int]:
    """60 generated rows plus 7 repeated ones (split across files), and the exact duplicate count."""
    base = generate(network_spec, 60, seed=9)
    frame = pd.concat([base, base.iloc[[0, 1, 2, 3, 4, 5, 5]]], ignore_index=True)
    expected = int(frame.duplicated().sum())
    assert expected >= 7
    return frame, expected


def test_duplicates_counted_and_kept_by_default(
    buckets: Any, layout: DayLayout, frame_with_duplicates: tuple[pd.DataFrame, int]
) -> None:
    frame, duplicates = frame_with_duplicates
    put_parts(buckets, layout, to_csv_parts(frame, 2))
    result = ingest_day(buckets, layout)
    assert (result.rows, result.duplicate_rows, result.dropped_duplicates) == (len(frame), duplicates, False)
    assert len(storage.read_parquet(buckets, layout.snapshot)) == len(frame)


def test_duplicates_dropped_when_spec_says_so(
    buckets: Any, settings: Settings, network_spec: DatasetSpec, frame_with_duplicates: tuple[pd.DataFrame, int]
) -> None:
    frame, duplicates = frame_with_duplicates
    layout = DayLayout(settings, dataclasses.replace(network_spec, drop_duplicates=True), DS)
    put_parts(buckets, layout, to_csv_parts(frame, 2))
    result = ingest_day(buckets, layout)
    assert (result.rows, result.duplicate_rows, result.dropped_duplicates) == (
        len(frame) - duplicates,
        duplicates,
        True,
    )
    snapshot = storage.read_parquet(buckets, layout.snapshot)
    assert not snapshot.duplicated().any()
    pd.testing.assert_frame_equal(snapshot, frame.drop_duplicates(ignore_index=True))
    assert storage.get_json(buckets, layout.snapshot_manifest)["dropped_duplicates"] is True


def test_rerun_gives_same_content_hash(buckets: Any, layout: DayLayout) -> None:
    publish_drop(buckets, layout, rows=200, seed=3, parts=2)
    first = ingest_day(buckets, layout)
    second = ingest_day(buckets, layout)
    assert first.content_hash == second.content_hash
    assert storage.get_json(buckets, layout.snapshot_manifest)["content_sha256"] == first.content_hash
    # The hash tracks content: a different drop for the day gives a different hash.
    publish_drop(buckets, layout, rows=200, seed=4, parts=2)
    assert ingest_day(buckets, layout).content_hash != first.content_hash


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "is empty"),
        (b" \n\n  \n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text CSV"),
        (b"just one column\n1\n2\n", "no comma-separated header"),
        (b"a,b,c\n1,2,3\n4,5,6,7,8\n", "not a well-formed CSV"),
    ],
    ids=["empty", "whitespace-only", "binary", "no-comma-header", "ragged-rows"],
)
def test_unreadable_file_rejected_naming_it(
    buckets: Any, layout: DayLayout, network_spec: DatasetSpec, body: bytes, expected: str
) -> None:
    good = to_csv_parts(generate(network_spec, 50, seed=1))[0]
    _, bad_key = put_parts(buckets, layout, [good, body])
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, layout)
    assert expected in err.value.reason
    assert bad_key in err.value.reason
    assert err.value.files == [bad_key]
    assert not storage.exists(buckets, layout.snapshot)


def test_header_only_file_is_fine_for_ingest(buckets: Any, layout: DayLayout, network_spec: DatasetSpec) -> None:
    """A header-only day ingests to 0 rows (the GX row-count expectation rejects it later)."""
    put_parts(buckets, layout, [header(network_spec)])
    result = ingest_day(buckets, layout)
    assert result.rows == 0
    snapshot = storage.read_parquet(buckets, layout.snapshot)
    assert len(snapshot) == 0
    assert snapshot.dtypes.astype(str).to_dict() == network_spec.dtypes


def test_header_only_part_adds_no_rows(buckets: Any, layout: DayLayout, network_spec: DatasetSpec) -> None:
    good = to_csv_parts(generate(network_spec, 50, seed=1))[0]
    put_parts(buckets, layout, [good, header(network_spec)])
    result = ingest_day(buckets, layout)
    manifest = storage.get_json(buckets, layout.snapshot_manifest)
    assert result.rows == 50
    assert [s["rows"] for s in manifest["source_files"]] == [50, 0]


@pytest.mark.parametrize("change", ["reordered", "renamed", "missing"])
def test_files_with_different_headers_rejected(
    buckets: Any, layout: DayLayout, network_spec: DatasetSpec, change: str
) -> None:
    frame = generate(network_spec, 40, seed=1)
    other = frame.iloc[20:]
    if change == "reordered":
        other = other[list(reversed(network_spec.column_names))]
    elif change == "renamed":
        other = other.rename(columns={"port": "Port"})
    else:
        other = other.drop(columns=["port"])
    keys = put_parts(buckets, layout, [to_csv_parts(frame.iloc[:20])[0], to_csv_parts(other)[0]])
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, layout)
    assert keys[1] in err.value.reason
    assert "share one header" in err.value.reason
    assert err.value.files == [keys[1]]


def test_same_header_on_every_part_is_accepted(buckets: Any, layout: DayLayout, network_spec: DatasetSpec) -> None:
    """Control for the header check: identical headers across parts do not trip it."""
    put_parts(buckets, layout, to_csv_parts(generate(network_spec, 40, seed=1), 2))
    assert ingest_day(buckets, layout).rows == 40


@pytest.mark.parametrize("other_files", [[], ["_SUCCESS", "notes.txt"]], ids=["nothing", "no-csv"])
def test_no_csv_rejected(buckets: Any, layout: DayLayout, other_files: list[str]) -> None:
    for name in other_files:
        storage.put_bytes(buckets, layout.raw_prefix.child(name), b"a,b\n1,2\n")
    with pytest.raises(DataRejected, match="no CSV files") as err:
        ingest_day(buckets, layout)
    assert layout.raw_prefix.uri in err.value.reason
    assert err.value.files == []


def test_other_days_are_not_read(buckets: Any, settings: Settings, layout: DayLayout) -> None:
    publish_drop(buckets, DayLayout(settings, layout.spec, "2026-01-04"), rows=100, seed=1)
    publish_drop(buckets, layout, rows=120, seed=2)
    assert ingest_day(buckets, layout).rows == 120


def test_missing_lake_bucket_is_a_setup_error_not_a_data_error(
    mock_s3: Any, settings: Settings, layout: DayLayout
) -> None:
    """A missing bucket is infrastructure: MissingBucket, never DataRejected (which would quarantine)."""
    publish_drop(mock_s3, layout, rows=50, seed=1)  # creates the raw bucket only
    with pytest.raises(storage.MissingBucket, match=settings.lake_bucket):
        ingest_day(mock_s3, layout)


def test_browser_urls_of_objects_and_runs(mock_s3):
    from tasks.storage import browser_url, mlflow_artifact_url, mlflow_run_url

    uri = "s3://lake/validation/network_security/ds=2026-01-01/result.json"
    presigned = browser_url(mock_s3, uri, "http://127.0.0.1:4566", "us-east-1")
    assert "validation/network_security/ds%3D2026-01-01/result.json?" in presigned
    assert "Signature" in presigned and "Expires" in presigned  # a signed GET, not an anonymous one
    assert browser_url(mock_s3, uri, None, "eu-west-1") == (
        "https://eu-west-1.console.aws.amazon.com/s3/object/lake?region=eu-west-1"
        "&prefix=validation%2Fnetwork_security%2Fds%3D2026-01-01%2Fresult.json"
    )
    assert mlflow_run_url("http://127.0.0.1:5050/", "3", "abc") == "http://127.0.0.1:5050/#/experiments/3/runs/abc"
    assert mlflow_artifact_url("http://m:5050", "abc", "drift/report.html") == (
        "http://m:5050/get-artifact?path=drift%2Freport.html&run_uuid=abc"
    )


# --- the streaming reader gives today's snapshot -----------------------------------------------


def todays_reader(bodies: list[bytes], spec: DatasetSpec) -> pd.DataFrame:
    """The reader before bounded ingestion, kept as the oracle: each file whole as text, then coerced."""
    frames = [
        pd.read_csv(io.StringIO(body.decode("utf-8")), dtype=str, keep_default_na=True, skipinitialspace=True)
        for body in bodies
    ]
    return coerce_to_spec(pd.concat(frames, ignore_index=True), spec)


def _edited(spec: DatasetSpec, rows: int, seed: int, edits: dict[tuple[int, str], str]) -> bytes:
    frame = generate(spec, rows, seed=seed).astype(str)
    for (row, column), value in edits.items():
        frame.loc[row, column] = value
    return to_csv_parts(frame)[0]


def _same_day_cases(network: DatasetSpec, flows: DatasetSpec) -> dict[str, tuple[DatasetSpec, list[bytes]]]:
    base = generate(network, 60, seed=9)
    with_duplicates = pd.concat([base, base.iloc[[0, 1, 2, 3, 4, 5, 5]]], ignore_index=True)
    return {
        "three parts": (network, to_csv_parts(generate(network, 900, seed=3), 3)),
        "float dataset": (flows, to_csv_parts(generate(flows, 700, seed=3), 2)),
        "duplicates": (network, to_csv_parts(with_duplicates, 2)),
        "flows duplicates": (flows, to_csv_parts(pd.concat([generate(flows, 50, seed=2)] * 2), 2)),
        "header-only part": (network, [to_csv_parts(generate(network, 50, seed=1))[0], header(network)]),
        # 3.0 in an integer column: pyarrow's integer parser refuses it, pandas' rules accept it.
        "float-written integer": (flows, [_edited(flows, 300, 1, {(250, "distinct_ports"): "3.0"})]),
        # 300 late in the file: the column becomes int64 for the whole day, as today.
        "out of int8 range": (network, [_edited(network, 400, 1, {(390, "Favicon"): "300"})]),
        "nulls in an int column": (network, [_edited(network, 400, 1, {(2, "Iframe"): "", (380, "SFH"): "NA"})]),
        "leading blanks": (network, [_edited(network, 100, 1, {(7, "port"): "  1", (8, "SFH"): " -1"})]),
        "extra column": (network, [to_csv_parts(generate(network, 80, seed=1).assign(comment="x é"))[0]]),
        "missing column": (network, [to_csv_parts(generate(network, 80, seed=1).drop(columns=["port"]))[0]]),
    }


@pytest.mark.parametrize("block_bytes", [4 * 1024 * 1024, 4096], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize(
    "case",
    [
        "three parts",
        "float dataset",
        "duplicates",
        "flows duplicates",
        "header-only part",
        "float-written integer",
        "out of int8 range",
        "nulls in an int column",
        "leading blanks",
        "extra column",
        "missing column",
    ],
)
def test_streaming_snapshot_equals_todays_reader(
    buckets, settings, network_spec, flows_spec, monkeypatch, case, block_bytes
) -> None:
    """Same table, same dtypes, same content hash as the whole-file reader, in one block or many."""
    monkeypatch.setattr(ingest, "BLOCK_BYTES", block_bytes)
    spec, bodies = _same_day_cases(network_spec, flows_spec)[case]
    layout = DayLayout(settings, spec, DS)
    put_parts(buckets, layout, bodies)
    expected = todays_reader(bodies, spec)
    if spec.drop_duplicates:
        expected = expected.drop_duplicates(ignore_index=True)

    result = ingest_day(buckets, layout)

    snapshot = storage.read_parquet(buckets, layout.snapshot)
    text_columns = [c for c in expected.columns if c not in spec.column_names]
    # Text columns outside the spec are Arrow-backed strings now (compact), not Python objects.
    assert all(str(snapshot[c].dtype) in ("string", "object") for c in text_columns)
    # Floats within rounding: pandas' parser is off in the last bits on some values, pyarrow's is exact.
    pd.testing.assert_frame_equal(snapshot, expected, check_dtype=False, obj="snapshot")
    assert snapshot.drop(columns=text_columns).dtypes.to_dict() == expected.drop(columns=text_columns).dtypes.to_dict()
    if not text_columns and all(c.is_integer for c in spec.columns):
        assert result.content_hash == content_hash(expected), "the content hash of a good drop changed"
    assert result.rows == len(expected)
    assert ingest_day(buckets, layout).content_hash == result.content_hash  # deterministic


def test_floats_are_parsed_exactly(buckets, settings, flows_spec) -> None:
    """The snapshot holds exactly the floats the export wrote (the whole-file reader was off in the last bits)."""
    frame = generate(flows_spec, 700, seed=3)
    layout = DayLayout(settings, flows_spec, DS)
    put_parts(buckets, layout, to_csv_parts(frame, 2))
    ingest_day(buckets, layout)
    snapshot = storage.read_parquet(buckets, layout.snapshot)
    pd.testing.assert_frame_equal(snapshot, frame.drop_duplicates(ignore_index=True), check_exact=True)
    old = todays_reader(to_csv_parts(frame, 2), flows_spec)
    for column in flows_spec.columns:
        if not column.is_integer:
            np.testing.assert_allclose(snapshot[column.name], old[column.name], rtol=1e-13)


def test_content_hash_in_row_chunks_is_the_whole_frame_hash(network_spec, monkeypatch) -> None:
    import hashlib

    frame = generate(network_spec, 1000, seed=4).assign(note=pd.array(["x", None] * 500, dtype="string[pyarrow]"))
    frame["Iframe"] = frame["Iframe"].astype("Int8").mask(frame.index % 7 == 0)
    whole = hashlib.sha256()
    whole.update("|".join(f"{c}:{t}" for c, t in frame.dtypes.astype(str).items()).encode())
    whole.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    monkeypatch.setattr(ingest, "HASH_ROWS", 64)
    assert content_hash(frame) == whole.hexdigest()
    assert content_hash(frame.iloc[:0]) == content_hash(frame.iloc[:0].copy())


def test_na_strings_are_pandas_defaults() -> None:
    from pandas._libs.parsers import STR_NA_VALUES

    assert set(ingest.NA_VALUES) == set(STR_NA_VALUES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicate_mask_equals_pandas_duplicated(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    frame = pd.DataFrame(
        {
            "a": rng.integers(-1, 2, n).astype("int8"),
            "b": pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(0, 2, n)), dtype="Int8"),
            "c": np.where(rng.random(n) < 0.1, np.nan, rng.choice([0.0, -0.0, 1.5], n)),
            "d": pd.array(rng.choice(["x", "y", None], n), dtype="string[pyarrow]"),
        }
    )
    expected = frame.duplicated().to_numpy()
    assert expected.any() and not expected.all()
    assert (ingest.duplicate_mask(frame) == expected).all()
    assert not ingest.duplicate_mask(frame.iloc[:0]).any()
    assert not ingest.duplicate_mask(frame.assign(row=np.arange(n))).any()  # a column of distinct values


# --- limits: each at the limit (accepted) and over it (rejected, naming it) ---------------------


class RecordingS3:
    """The S3 client, recording every GetObject as (key, Range) so a test sees what was read."""

    def __init__(self, client: Any):
        self.client = client
        self.gets: list[tuple[str, str | None]] = []

    def get_object(self, **kwargs: Any) -> Any:
        self.gets.append((kwargs["Key"], kwargs.get("Range")))
        return self.client.get_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _with_limits(layout: DayLayout, **limits: int) -> DayLayout:
    spec = dataclasses.replace(layout.spec, limits=dataclasses.replace(layout.spec.limits, **limits))
    return DayLayout(layout.settings, spec, layout.ds)


def test_default_limits_are_documented_and_sane(network_spec: DatasetSpec) -> None:
    limits = network_spec.limits
    assert limits == IngestLimits()
    assert (limits.max_file_bytes, limits.max_columns, limits.max_rows) == (256 * 2**20, 1000, 5_000_000)
    # A day at max_rows of the default spec fits in max_table_bytes (31 int8 cells a row).
    assert limits.max_rows * len(network_spec.columns) <= limits.max_table_bytes


def test_file_over_max_file_bytes_is_rejected_before_any_read(buckets, layout, network_spec) -> None:
    good, big = to_csv_parts(generate(network_spec, 300, seed=1), 2)
    keys = put_parts(buckets, layout, [good, big])
    recording = RecordingS3(buckets)

    at_limit = _with_limits(layout, max_file_bytes=max(len(good), len(big)))
    assert ingest_day(recording, at_limit).rows == 300

    recording.gets.clear()
    over = _with_limits(layout, max_file_bytes=len(big) - 1)
    with pytest.raises(DataRejected) as err:
        ingest_day(recording, over)
    assert err.value.reason.startswith(f"raw file {keys[1]} is {len(big):,} bytes, over limits.max_file_bytes = ")
    assert f"{len(big) - 1:,}" in err.value.reason and "smaller files" in err.value.reason
    assert err.value.files == [keys[1]]
    assert recording.gets == [], "nothing may be read from a drop over the size limit"


def test_header_over_max_columns_is_rejected_from_the_first_bytes(buckets, layout, network_spec) -> None:
    frame = generate(network_spec, 2000, seed=1).assign(comment=1)  # 32 columns
    (body,) = put_parts(buckets, layout, to_csv_parts(frame))
    recording = RecordingS3(buckets)

    assert ingest_day(recording, _with_limits(layout, max_columns=32)).rows == 2000

    recording.gets.clear()
    with pytest.raises(DataRejected) as err:
        ingest_day(recording, _with_limits(layout, max_columns=31))
    assert f"raw file {body} has 32 columns, over limits.max_columns = 31" in err.value.reason
    assert "(the spec has 31)" in err.value.reason and "export only the spec's columns" in err.value.reason
    assert err.value.files == [body]
    assert recording.gets == [(body, f"bytes=0-{ingest.HEAD_BYTES - 1}")], "only the first bytes are read"


def test_ten_thousand_columns_are_rejected_against_the_default_limit(buckets, layout) -> None:
    names = [f"column_{i:05d}" for i in range(10_000)]
    body = (",".join(names) + "\n" + (",".join(["1"] * 10_000) + "\n") * 20).encode()
    assert len(body) > ingest.HEAD_BYTES  # the header is longer than the first range read
    (key,) = put_parts(buckets, layout, [body])
    recording = RecordingS3(buckets)

    with pytest.raises(DataRejected, match="has 10,000 columns, over limits.max_columns = 1,000"):
        ingest_day(recording, layout)
    assert [r for _, r in recording.gets] == [f"bytes=0-{ingest.HEAD_BYTES - 1}", "bytes=0-255999"]


def test_a_header_without_line_break_in_the_budget_is_rejected(buckets, layout) -> None:
    (key,) = put_parts(buckets, layout, [b"a," * 200_000])
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, layout)
    assert f"raw file {key} has no line break in its first 256,000 bytes" in err.value.reason
    assert "limits.max_columns = 1,000" in err.value.reason


def test_day_over_max_rows_is_rejected_while_streaming(buckets, layout, network_spec, monkeypatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 4096)
    put_parts(buckets, layout, to_csv_parts(generate(network_spec, 500, seed=1), 2))

    assert ingest_day(buckets, _with_limits(layout, max_rows=500)).rows == 500

    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, _with_limits(layout, max_rows=499))
    assert f"the drop of ds={DS} holds more than limits.max_rows = 499 rows" in err.value.reason
    assert "at most 499 rows a day" in err.value.reason
    assert err.value.files == []  # the whole day is too large: every file is quarantined


def test_day_over_max_table_bytes_is_rejected_while_streaming(buckets, layout, network_spec) -> None:
    put_parts(buckets, layout, to_csv_parts(generate(network_spec, 500, seed=1), 2))
    table_bytes = 500 * len(network_spec.columns)  # one byte per int8 cell

    assert ingest_day(buckets, _with_limits(layout, max_table_bytes=table_bytes)).rows == 500

    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, _with_limits(layout, max_table_bytes=table_bytes - 1))
    assert f"needs more than limits.max_table_bytes = {table_bytes - 1:,} bytes" in err.value.reason
    assert err.value.files == []


def test_text_columns_count_against_max_table_bytes(buckets, layout, network_spec) -> None:
    """Columns outside the spec are held as text: a wide text drop hits the memory limit, not the worker."""
    frame = generate(network_spec, 200, seed=1).assign(**{f"note_{i}": "x" * 50 for i in range(20)})
    put_parts(buckets, layout, to_csv_parts(frame))
    with pytest.raises(DataRejected, match="columns outside the spec are held as text"):
        ingest_day(buckets, _with_limits(layout, max_table_bytes=100_000))


def test_a_rejected_limit_is_quarantined_with_its_reason(buckets, layout, network_spec) -> None:
    keys = put_parts(buckets, layout, to_csv_parts(generate(network_spec, 100, seed=1), 2))
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, _with_limits(layout, max_rows=10))
    uri = quarantine_drop(buckets, layout, err.value.reason, "ingest", err.value.files)
    note = storage.get_json(buckets, storage.parse_s3_uri(uri))
    assert "limits.max_rows = 10" in note["reason"]
    assert note["raw_files"] == [f"s3://{layout.raw_prefix.bucket}/{k}" for k in keys]


# --- the body is streamed and checked as it is read ---------------------------------------------


def test_the_body_is_streamed_never_read_whole(buckets, layout, network_spec, monkeypatch) -> None:
    def whole_read(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("ingestion read a raw file whole")

    monkeypatch.setattr(storage, "get_bytes", whole_read)
    put_parts(buckets, layout, to_csv_parts(generate(network_spec, 300, seed=1), 2))
    recording = RecordingS3(buckets)
    assert ingest_day(recording, layout).rows == 300
    bodies = [key for key, byte_range in recording.gets if byte_range is None]
    assert len(bodies) == 2  # one streamed GET per file, after the ranged header reads


def test_invalid_utf8_deep_in_a_file_names_its_offset(buckets, layout, network_spec, monkeypatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 4096)
    body = bytearray(to_csv_parts(generate(network_spec, 3000, seed=1))[0])
    offset = len(body) - 500
    body[offset] = 0xFF
    (key,) = put_parts(buckets, layout, [bytes(body)])
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, layout)
    assert err.value.reason.startswith(f"raw file {key} is not a UTF-8 text CSV (byte {offset} is 0xff)")


def test_multibyte_text_across_blocks_is_fine(buckets, layout, network_spec, monkeypatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 4096)
    frame = generate(network_spec, 500, seed=1).assign(note="é€😀")
    put_parts(buckets, layout, to_csv_parts(frame))
    result = ingest_day(buckets, layout)
    assert storage.read_parquet(buckets, layout.snapshot)["note"].eq("é€😀").all() and result.rows == 500


def test_every_bad_value_of_a_file_is_counted_across_blocks(buckets, layout, network_spec, monkeypatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 4096)
    body = _edited(network_spec, 3000, 1, {(10, "SFH"): "abc", (1500, "SFH"): "zz", (2990, "SFH"): "abc"})
    (key,) = put_parts(buckets, layout, [body])
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, layout)
    assert err.value.reason == (
        f"column 'SFH' in {key} must be numeric (int8) but holds 3 non-numeric value(s), e.g. ['abc', 'zz']"
    )
    assert err.value.files == [key]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("1.5", "column 'distinct_ports' in {key} must hold integers (int32) but holds [1.5]"),
        ("inf", "column 'distinct_ports' in {key} holds 1 infinite value(s)"),
        ("99999999999999999999999", "column 'distinct_ports' in {key} holds integers outside the int64 range"),
    ],
)
def test_integer_rules_hold_in_the_streaming_reader(buckets, settings, flows_spec, edit, expected) -> None:
    layout = DayLayout(settings, flows_spec, DS)
    (key,) = put_parts(buckets, layout, [_edited(flows_spec, 200, 1, {(150, "distinct_ports"): edit})])
    with pytest.raises(DataRejected) as err:
        ingest_day(buckets, layout)
    assert err.value.reason.startswith(expected.format(key=key))


def test_infinite_float_rejected_by_the_typed_reader(buckets, settings, flows_spec) -> None:
    layout = DayLayout(settings, flows_spec, DS)
    (key,) = put_parts(buckets, layout, [_edited(flows_spec, 200, 1, {(5, "bytes_per_s"): "-inf"})])
    with pytest.raises(DataRejected, match=f"column 'bytes_per_s' in {key} holds 1 infinite value"):
        ingest_day(buckets, layout)


def test_a_short_row_is_not_a_well_formed_csv(buckets, layout, network_spec) -> None:
    body = to_csv_parts(generate(network_spec, 20, seed=1))[0] + b"1,0,1\n"
    (key,) = put_parts(buckets, layout, [body])
    with pytest.raises(DataRejected, match=f"raw file {key} is not a well-formed CSV"):
        ingest_day(buckets, layout)


def test_a_file_that_grows_after_the_listing_is_rejected(buckets, layout, network_spec, monkeypatch) -> None:
    (key,) = put_parts(buckets, layout, to_csv_parts(generate(network_spec, 300, seed=1)))
    listed = storage.list_sizes

    def stale_listing(*args: Any) -> list[tuple[str, int]]:
        return [(k, size - 100) for k, size in listed(*args)]

    monkeypatch.setattr(storage, "list_sizes", stale_listing)
    with pytest.raises(DataRejected, match=f"raw file {key} changed while it was read: listed at "):
        ingest_day(buckets, layout)


# --- quarantine keeps the paths below the day's prefix -----------------------------------------


def test_quarantine_keeps_relative_paths(buckets, layout, network_spec) -> None:
    bodies = {"a/x.csv": b"a,b\n1,2\n", "b/x.csv": b"a,b\n3,4\n", "x.csv": b"a,b\n5,6\n"}
    for name, body in bodies.items():
        storage.put_bytes(buckets, layout.raw_prefix.child(name), body)

    uri = quarantine_drop(buckets, layout, "bad", "ingest")

    note = storage.get_json(buckets, storage.parse_s3_uri(uri))
    for name, body in bodies.items():
        assert storage.get_bytes(buckets, layout.quarantine_dir.child(name)) == body
    assert note["quarantined_files"] == [layout.quarantine_dir.child(n).uri for n in sorted(bodies)]
    assert note["raw_files"] == [layout.raw_prefix.child(n).uri for n in sorted(bodies)]
    kept = storage.list_keys(buckets, layout.quarantine_dir.bucket, layout.quarantine_dir.key + "/")
    assert len(kept) == 4  # three files and reason.json: nothing overwritten


def test_quarantine_of_named_files_only(buckets, layout) -> None:
    for name in ("a/x.csv", "b/x.csv"):
        storage.put_bytes(buckets, layout.raw_prefix.child(name), b"a,b\n1,2\n")
    offending = layout.raw_prefix.child("b/x.csv").key
    uri = quarantine_drop(buckets, layout, "bad", "ingest", [offending])
    note = storage.get_json(buckets, storage.parse_s3_uri(uri))
    assert note["quarantined_files"] == [layout.quarantine_dir.child("b/x.csv").uri]
    assert not storage.exists(buckets, layout.quarantine_dir.child("a/x.csv"))


def test_a_file_too_large_for_one_copy_is_quarantined_in_parts(buckets, layout, monkeypatch) -> None:
    """Above COPY_SINGLE_MAX_BYTES (4 GiB; here 8 MiB) quarantine copies in parts, still server-side."""
    monkeypatch.setattr(storage, "COPY_SINGLE_MAX_BYTES", 8 * 2**20)
    monkeypatch.setattr(storage, "COPY_PART_BYTES", 5 * 2**20)
    body = np.random.default_rng(0).bytes(12 * 2**20)
    storage.put_bytes(buckets, layout.raw_prefix.child("big/part-0000.csv"), body)
    quarantine_drop(buckets, layout, "too large", "ingest")
    copied = buckets.head_object(
        Bucket=layout.quarantine_dir.bucket, Key=layout.quarantine_dir.child("big/part-0000.csv").key
    )
    assert copied["ETag"].strip('"').endswith("-3")  # a multipart object: three parts
    assert storage.get_bytes(buckets, layout.quarantine_dir.child("big/part-0000.csv")) == body
