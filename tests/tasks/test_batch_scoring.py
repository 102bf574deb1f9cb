"""Batch scoring without Airflow: chunked scoring equals the pipeline and the serving app, the
outputs and the prediction log are idempotent per ds, bad rows are rejected with the reason."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from tasks import batch_scoring, drift, feedback, storage
from tasks.batch_scoring import BatchLayout, BatchScoringConfig, BatchScoringError
from tasks.datagen import generate
from tasks.dataset_spec import DatasetSpec
from tasks.transform import build_preprocessor

RAW, LAKE = "network-security-raw", "network-security-lake"
DS = "2026-03-10"
SCORED_AT = dt.datetime(2026, 3, 11, tzinfo=dt.UTC)
MODEL = "network_security"


@pytest.fixture(scope="module")
def pipelines(network_spec: DatasetSpec) -> dict[str, Pipeline]:
    """The two kinds the server scores differently: a forest (compiled, batch-invariant) and a
    logistic regression (compiled one-hot, BLAS estimator)."""
    train = generate(network_spec, 3000, seed=1)
    models = {
        "forest": RandomForestClassifier(n_estimators=25, max_depth=8, random_state=0),
        "logistic": LogisticRegression(max_iter=2000),
    }
    return {
        name: Pipeline([("preprocess", build_preprocessor(network_spec)), ("model", model)]).fit(
            train[network_spec.feature_names], train[network_spec.target.name]
        )
        for name, model in models.items()
    }


def put_backlog(s3: Any, name: str, frame: pd.DataFrame, ds: str = DS) -> str:
    key = f"network_data_backlog/ds={ds}/{name}"
    if name.endswith(".csv"):
        body = frame.to_csv(index=False).encode()
    else:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        body = buffer.getvalue()
    s3.put_object(Bucket=RAW, Key=key, Body=body)
    return key


def layout(spec: DatasetSpec, chunk_rows: int = 1000) -> BatchLayout:
    return BatchLayout(RAW, LAKE, spec, DS, BatchScoringConfig(chunk_rows=chunk_rows))


def score(s3: Any, spec: DatasetSpec, pipeline: Pipeline, chunk_rows: int = 1000, at: dt.datetime = SCORED_AT) -> dict:
    model = batch_scoring.scoring_model(pipeline, spec, MODEL, "7")
    return batch_scoring.score_backlog(s3, layout(spec, chunk_rows), model, scored_at=at)


def lake_keys(s3: Any, prefix: str) -> list[str]:
    return storage.list_keys(s3, LAKE, prefix)


def test_config_file_and_layout(network_spec: DatasetSpec) -> None:
    config = batch_scoring.load_batch_scoring_config()
    assert config == BatchScoringConfig()
    day = BatchLayout(RAW, LAKE, network_spec, DS, config)
    assert day.backlog.uri == f"s3://{RAW}/network_data_backlog/ds={DS}/"
    assert day.predictions_dir.uri == f"s3://{LAKE}/batch_scores/network_security/ds={DS}/predictions"
    assert day.output_key("part-0", 3) == f"batch_scores/network_security/ds={DS}/predictions/part-part-0-00003.parquet"
    assert (
        day.log_key(MODEL, SCORED_AT, "part-0", 3)
        == f"predictions/{MODEL}/dt=2026-03-11/00/batch-{DS}-part-0-00003.parquet"
    )
    with pytest.raises(ValueError, match="ds must be a day written YYYY-MM-DD"):
        BatchLayout(RAW, LAKE, network_spec, "yesterday")


def test_chunks_score_like_the_pipeline_and_land_in_the_prediction_log(
    buckets: Any, network_spec: DatasetSpec, pipelines: dict[str, Pipeline]
) -> None:
    names = network_spec.feature_names
    first, second = generate(network_spec, 2500, seed=2), generate(network_spec, 1700, seed=3)
    put_backlog(buckets, "a.csv", first)  # the label column is there too: ignored
    put_backlog(buckets, "b.parquet", second[names])
    pipeline = pipelines["forest"]
    manifest = score(buckets, network_spec, pipeline)
    assert (manifest["files"], manifest["rows_read"], manifest["rows_scored"], manifest["chunks"]) == (2, 4200, 4200, 5)
    assert manifest["rows_rejected"] == 0 and manifest["rejected_uri"] is None
    assert manifest["model_version"] == "7" and manifest["predictor"].startswith("compiled")
    out = batch_scoring.read_scores(buckets, manifest)
    rows = pd.concat([first[names], second[names]], ignore_index=True)
    positive = list(pipeline.classes_).index(network_spec.positive_class)
    assert out["label"].tolist() == pipeline.predict(rows).tolist()
    np.testing.assert_allclose(out["probability"], pipeline.predict_proba(rows)[:, positive], rtol=0, atol=1e-12)
    pd.testing.assert_frame_equal(out[names], rows.astype({c.name: c.dtype for c in network_spec.features}))
    assert out["request_id"].tolist() == [f"batch-{DS}-a:{i}" for i in range(2500)] + [
        f"batch-{DS}-b:{i}" for i in range(1700)
    ]
    assert set(out["source"]) == {"batch"} and set(out["model_version"]) == {"7"}
    assert set(out["timestamp"]) == {"2026-03-11T00:00:00.000+00:00"}
    # The serving app's keys in its order, then the optional source.
    assert list(out.columns) == [
        "request_id",
        "timestamp",
        "model_name",
        "model_version",
        *names,
        "label",
        "probability",
        "source",
    ]
    keys = lake_keys(buckets, f"predictions/{MODEL}/")
    assert keys == sorted(manifest["prediction_log_keys"]) and len(keys) == 5
    # The output parts are the log objects, byte for byte.
    output = lake_keys(buckets, f"batch_scores/network_security/ds={DS}/predictions/")
    assert output == sorted(manifest["output_keys"]) and len(output) == 5
    body = storage.get_bytes
    assert [body(buckets, storage.S3Location(LAKE, k)) for k in manifest["output_keys"]] == [
        body(buckets, storage.S3Location(LAKE, k)) for k in manifest["prediction_log_keys"]
    ]
    # Both monitors read the objects: the drift reader and the feedback join.
    schema = drift.current_schema(network_spec)
    logged = pa.concat_tables(
        drift.read_object(storage.get_bytes(buckets, storage.S3Location(LAKE, k)), k, schema) for k in keys
    )
    assert logged.num_rows == 4200
    joined = feedback.read_predictions(buckets, LAKE, MODEL, network_spec, keys, out["request_id"].head(10))
    assert sorted(joined["request_id"]) == sorted(out["request_id"].head(10)) and set(joined["source"]) == {"batch"}


def test_read_chunks_never_holds_more_than_a_chunk(tmp_path: Any, network_spec: DatasetSpec) -> None:
    frame = generate(network_spec, 10_000, seed=4)
    path = tmp_path / "backlog.csv"
    frame.to_csv(path, index=False)
    chunks = list(batch_scoring.read_chunks(path, "backlog.csv", network_spec, 1234))
    assert [len(c) for c in chunks] == [1234] * 8 + [10_000 - 8 * 1234]
    expected = frame[network_spec.feature_names].to_numpy(dtype=float)
    np.testing.assert_array_equal(np.vstack(chunks), expected)
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "backlog.parquet", row_group_size=3000)
    chunks = list(batch_scoring.read_chunks(tmp_path / "backlog.parquet", "b.parquet", network_spec, 4096))
    assert [len(c) for c in chunks] == [4096, 4096, 10_000 - 2 * 4096]
    np.testing.assert_array_equal(np.vstack(chunks), expected)


def test_rerun_of_a_day_is_idempotent(buckets: Any, network_spec: DatasetSpec, pipelines: dict[str, Pipeline]) -> None:
    put_backlog(buckets, "part-0.csv", generate(network_spec, 3500, seed=5))
    first = score(buckets, network_spec, pipelines["forest"])
    bodies = {k: storage.get_bytes(buckets, storage.S3Location(LAKE, k)) for k in lake_keys(buckets, "")}
    again = score(buckets, network_spec, pipelines["forest"])
    assert again == first
    assert {k: storage.get_bytes(buckets, storage.S3Location(LAKE, k)) for k in lake_keys(buckets, "")} == bodies
    # Fewer, larger chunks: the log objects the first run wrote and this one did not are gone.
    bigger = score(buckets, network_spec, pipelines["forest"], chunk_rows=2000)
    assert len(bigger["prediction_log_keys"]) == 2
    assert lake_keys(buckets, f"predictions/{MODEL}/") == sorted(bigger["prediction_log_keys"])
    assert lake_keys(buckets, f"batch_scores/network_security/ds={DS}/predictions/") == sorted(bigger["output_keys"])
    # Another scoring time moves the records to its hour; the old hour is emptied.
    later = score(buckets, network_spec, pipelines["forest"], at=SCORED_AT + dt.timedelta(hours=5))
    assert lake_keys(buckets, f"predictions/{MODEL}/") == sorted(later["prediction_log_keys"])
    assert all("/dt=2026-03-11/05/" in k for k in later["prediction_log_keys"])
    out = batch_scoring.read_scores(buckets, later)
    assert len(out) == 3500 and out["request_id"].is_unique


def test_bad_rows_are_rejected_with_the_reason(
    buckets: Any, network_spec: DatasetSpec, pipelines: dict[str, Pipeline]
) -> None:
    frame = generate(network_spec, 1200, seed=6)[network_spec.feature_names].astype("float64")
    first, second = network_spec.feature_names[:2]
    frame.loc[3, first] = 2  # not an allowed value
    frame.loc[5, second] = np.nan  # missing
    frame.loc[1100, first] = 0.5  # not an allowed value either
    put_backlog(buckets, "part-0.csv", frame)
    manifest = score(buckets, network_spec, pipelines["forest"])
    assert (manifest["rows_read"], manifest["rows_scored"], manifest["rows_rejected"]) == (1200, 1197, 3)
    rejected = storage.read_parquet(buckets, storage.parse_s3_uri(manifest["rejected_uri"]))
    assert rejected["request_id"].tolist() == [f"batch-{DS}-part-0:{i}" for i in (3, 5, 1100)]
    assert rejected["reason"].tolist() == [
        f"{first}: not an allowed value",
        f"{second}: missing",
        f"{first}: not an allowed value",
    ]
    out = batch_scoring.read_scores(buckets, manifest)
    assert f"batch-{DS}-part-0:3" not in set(out["request_id"]) and len(out) == 1197
    # Fixed upstream and rerun: the stale rejects go.
    put_backlog(buckets, "part-0.csv", generate(network_spec, 1200, seed=6))
    fixed = score(buckets, network_spec, pipelines["forest"])
    assert fixed["rows_rejected"] == 0 and not storage.exists(buckets, layout(network_spec).rejected)


def test_numeric_bounds_and_whole_numbers_are_checked(flows_spec: DatasetSpec) -> None:
    names = flows_spec.feature_names
    matrix = generate(flows_spec, 4, seed=1)[names].to_numpy(dtype=float)
    matrix[0, names.index("syn_ratio")] = 1.5
    matrix[1, names.index("distinct_ports")] = 2.5
    matrix[2, names.index("bytes_per_s")] = -1
    reasons = batch_scoring.reject_reasons(matrix, flows_spec).tolist()
    assert reasons == ["syn_ratio: above 1", "distinct_ports: not a whole number", "bytes_per_s: below 0", ""]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"having_IP_Address,URL_Length\n1,1\n", "lacks a feature column"),
        (None, "cannot be read as the 'network_security' features"),
    ],
)
def test_unreadable_backlog_fails_naming_the_file(
    buckets: Any, network_spec: DatasetSpec, pipelines: dict[str, Pipeline], body: bytes | None, message: str
) -> None:
    if body is None:
        frame = generate(network_spec, 20, seed=1).astype(str)
        frame.loc[7, "URL_Length"] = "long"
        body = frame.to_csv(index=False).encode()
    buckets.put_object(Bucket=RAW, Key=f"network_data_backlog/ds={DS}/bad.csv", Body=body)
    with pytest.raises(BatchScoringError, match=message) as caught:
        score(buckets, network_spec, pipelines["forest"])
    assert "bad.csv" in str(caught.value)


def test_no_backlog_and_wrong_model_are_clear_errors(
    buckets: Any, network_spec: DatasetSpec, flows_spec: DatasetSpec, pipelines: dict[str, Pipeline]
) -> None:
    with pytest.raises(BatchScoringError, match="no backlog for network_security ds=2026-03-10"):
        score(buckets, network_spec, pipelines["forest"])
    with pytest.raises(BatchScoringError, match="wrong model for this dataset"):
        batch_scoring.scoring_model(pipelines["forest"], flows_spec, "intrusion_flows", "1")


# --- the same answers as the serving app ------------------------------------------------------

SERVING_ROWS = 20_000  # bench/batch_scoring.py --check-rows compares 100k rows the same way


@pytest.mark.parametrize("kind", ["forest", "logistic"])
def test_batch_scoring_answers_like_the_serving_app(
    buckets: Any, network_spec: DatasetSpec, pipelines: dict[str, Pipeline], kind: str
) -> None:
    """The same rows through POST /predict/batch and through batch scoring: the same labels, and
    the same probabilities (bit for bit for the forest; to BLAS rounding for the regression)."""
    from tests.tasks.serving_app import serve_batches

    frame = generate(network_spec, SERVING_ROWS, seed=8)[network_spec.feature_names]
    put_backlog(buckets, "part-0.parquet", frame)
    manifest = score(buckets, network_spec, pipelines[kind], chunk_rows=7000)
    out = batch_scoring.read_scores(buckets, manifest)
    served = serve_batches(pipelines[kind], network_spec, frame, version="7")
    assert out["label"].tolist() == served["label"].tolist()
    if kind == "forest":
        assert out["probability"].tolist() == served["probability"].tolist()
    else:
        np.testing.assert_allclose(out["probability"], served["probability"], rtol=0, atol=1e-12)
