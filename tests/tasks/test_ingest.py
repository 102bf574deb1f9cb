"""Ingestion: raw CSV parts become one typed snapshot; unreadable drops are rejected by name."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pandas as pd
import pytest

from tasks import storage
from tasks.config import Settings
from tasks.datagen import generate, publish_drop, to_csv_parts
from tasks.dataset_spec import DatasetSpec
from tasks.ingest import DataRejected, coerce_to_spec, content_hash, ingest_day
from tasks.layout import DayLayout

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
