"""Delayed ground truth without Airflow: the spec's feedback section, generated feedback, the
daily drops, the join with the prediction log (late labels, duplicates, unknown ids, bad
input) and the training frame built from it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from tasks import feedback, storage
from tasks.datagen import FeedbackKnob, generate, label_feedback
from tasks.dataset_spec import DatasetSpec, SpecError, load_spec
from tasks.feedback import TRUE_LABEL, FeedbackError, JoinCounts
from tasks.traffic import send_traffic
from tests.tasks.labelled_traffic import LAKE, MODEL, RAW, hour_key, log_records, put_feedback, put_jsonl, put_parquet

UTC = dt.UTC
DAY = dt.datetime(2026, 3, 10, tzinfo=UTC)


def window(s3: Any, spec: DatasetSpec, days: list[str], lookback_days: int = 7, **kwargs: Any) -> Any:
    end = dt.datetime.fromisoformat(f"{days[-1]}T00:00:00+00:00") + dt.timedelta(days=1)
    return feedback.labelled_window(
        s3,
        raw_bucket=RAW,
        lake_bucket=LAKE,
        spec=spec,
        model_name=MODEL,
        feedback_days=days,
        predictions_from=end - dt.timedelta(days=lookback_days),
        predictions_to=end,
        **kwargs,
    )


# --- the spec's feedback section -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prefix", "label"),
    [
        ("network_security", "network_data_feedback", "Result"),
        ("intrusion_flows", "intrusion_flows_feedback", "is_attack"),
    ],
)
def test_both_specs_declare_their_feedback(name: str, prefix: str, label: str) -> None:
    shape = load_spec(name).feedback
    assert shape is not None
    assert (shape.prefix, shape.label_column) == (prefix, label)
    assert shape.column_names == ["request_id", label, "labelled_at"]


def _spec_file(tmp_path: Path, section: str) -> Path:
    text = Path(load_spec("intrusion_flows").source_file).read_text().split("feedback:")[0]
    path = tmp_path / "flows.yaml"
    path.write_text(text + section)
    return path


def test_feedback_section_defaults_to_the_target_name(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, "feedback: {prefix: /labels/}\n"))
    assert spec.feedback == feedback.FeedbackSpec(prefix="labels", label_column="is_attack")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("feedback: {request_id_column: id}\n", "needs a 'prefix'"),
        ("feedback: {prefix: x, labelled: y}\n", "unknown key"),
        ("feedback: {prefix: x, request_id_column: syn_ratio}\n", "clash"),
        ("feedback: {prefix: x, request_id_column: t, labelled_at_column: t}\n", "distinct"),
        ("feedback: [x]\n", "mapping"),
    ],
)
def test_bad_feedback_section_names_the_problem(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(_spec_file(tmp_path, section))


def test_a_dataset_without_feedback_says_what_to_add(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, ""))
    assert spec.feedback is None
    with pytest.raises(FeedbackError, match="add a `feedback:` section"):
        feedback.feedback_spec(spec)


# --- generated feedback ------------------------------------------------------------------------


def served(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "request_id": [f"req-{i}" for i in range(rows)],
            "served_at": pd.Timestamp("2026-03-10T08:00:00Z") + pd.to_timedelta(rng.integers(0, 3600, rows), unit="s"),
            TRUE_LABEL: rng.choice([-1, 1], rows),
        }
    )


def test_label_feedback_labels_a_share_after_the_delay(network_spec: DatasetSpec) -> None:
    traffic = served(4000)
    labels = label_feedback(traffic, network_spec, FeedbackKnob(labelled_share=0.3, delay_hours=10, delay_spread=0.5))
    assert list(labels.columns) == ["request_id", "Result", "labelled_at"]
    assert len(labels) == pytest.approx(1200, rel=0.1)
    assert labels["request_id"].is_unique
    merged = labels.merge(traffic, on="request_id")
    delay = (merged["labelled_at"] - merged["served_at"]).dt.total_seconds() / 3600
    assert delay.between(5, 15).all() and 9 < delay.mean() < 11
    # The truth the generator knew, unchanged.
    assert (merged["Result"] == merged[TRUE_LABEL]).all()
    assert labels["labelled_at"].is_monotonic_increasing
    pd.testing.assert_frame_equal(labels, label_feedback(traffic, network_spec, FeedbackKnob(0.3, 10, 0.5)))


def test_relabelled_requests_get_a_wrong_verdict_first(network_spec: DatasetSpec) -> None:
    traffic = served(2000)
    labels = label_feedback(traffic, network_spec, FeedbackKnob(labelled_share=1.0, relabel_share=0.25), seed=3)
    twice = labels[labels["request_id"].duplicated(keep=False)]
    assert twice["request_id"].nunique() == pytest.approx(500, rel=0.15)
    truth = traffic.set_index("request_id")[TRUE_LABEL]
    for request_id, rows in twice.groupby("request_id"):
        first, last = rows.sort_values("labelled_at")["Result"].tolist()
        assert first != truth[request_id] and last == truth[request_id]


def test_label_feedback_rejects_bad_knobs_and_inputs(network_spec: DatasetSpec) -> None:
    with pytest.raises(ValueError, match="labelled_share"):
        FeedbackKnob(labelled_share=1.5)
    with pytest.raises(ValueError, match="delay_hours"):
        FeedbackKnob(delay_hours=-1)
    with pytest.raises(ValueError, match="true_label"):
        label_feedback(served(5).drop(columns=[TRUE_LABEL]), network_spec)


def test_send_traffic_keeps_request_ids_and_truth(network_spec: DatasetSpec) -> None:
    """What the server answered (ids, version, label) next to the label the generator drew."""
    calls = []

    def server(request: httpx.Request) -> httpx.Response:
        records = json.loads(request.content)["records"]
        calls.append((request.url.path, len(records)))
        base = f"batch{len(calls)}"
        predictions = [
            {"label": 1, "probability": 0.25, "model_name": MODEL, "model_version": "4", "request_id": f"{base}:{i}"}
            for i in range(len(records))
        ]
        return httpx.Response(200, json={"predictions": predictions, "model_version": "4", "request_id": base})

    original = httpx.Client

    def client(*args: Any, **kwargs: Any) -> httpx.Client:
        return original(*args, transport=httpx.MockTransport(server), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpx, "Client", client)
        traffic = send_traffic("http://server", "key", network_spec, 1200, seed=9, batch_size=500, model="phish")
    assert calls == [
        ("/models/phish/predict/batch", 500),
        ("/models/phish/predict/batch", 500),
        ("/models/phish/predict/batch", 200),
    ]
    frame = traffic.predictions
    assert traffic.rows == 1200 and str(traffic) == "1200"
    assert frame["request_id"].tolist()[:2] == ["batch1:0", "batch1:1"] and frame["request_id"].iloc[-1] == "batch3:199"
    assert (frame["model_version"] == "4").all() and frame["served_at"].dt.tz is not None
    assert frame[TRUE_LABEL].tolist() == generate(network_spec, 1200, seed=9)["Result"].tolist()


# --- the daily drops --------------------------------------------------------------------------


def test_publish_feedback_lands_each_label_on_its_arrival_day(buckets: Any, network_spec: DatasetSpec) -> None:
    labels = pd.DataFrame(
        {
            "request_id": ["a", "b", "c"],
            "Result": [-1, 1, 1],
            "labelled_at": pd.to_datetime(["2026-03-10T23:59:59Z", "2026-03-11T00:00:00Z", "2026-03-12T05:00:00Z"]),
        }
    )
    uris = feedback.publish_feedback(buckets, RAW, network_spec, labels, "seed-7")
    assert uris == [
        f"s3://{RAW}/network_data_feedback/ds=2026-03-10/feedback-seed-7.csv",
        f"s3://{RAW}/network_data_feedback/ds=2026-03-11/feedback-seed-7.csv",
        f"s3://{RAW}/network_data_feedback/ds=2026-03-12/feedback-seed-7.csv",
    ]
    # Republishing the batch overwrites its files: the same rows, once.
    feedback.publish_feedback(buckets, RAW, network_spec, labels, "seed-7")
    counts = JoinCounts()
    read = feedback.read_feedback(buckets, RAW, network_spec, ["2026-03-10", "2026-03-11", "2026-03-12"], counts)
    assert read["request_id"].tolist() == ["a", "b", "c"]
    assert read[TRUE_LABEL].tolist() == [-1, 1, 1] and str(read[TRUE_LABEL].dtype) == "int8"
    assert read["labelled_at"].tolist() == labels["labelled_at"].tolist()
    assert counts.feedback_files == 3 and counts.feedback_rows == 3
    with pytest.raises(FeedbackError, match="batch_id"):
        feedback.publish_feedback(buckets, RAW, network_spec, labels, "../x")
    with pytest.raises(FeedbackError, match="lack column"):
        feedback.publish_feedback(buckets, RAW, network_spec, labels.drop(columns=["Result"]), "x")


def test_bad_feedback_rows_and_files_are_counted_and_skipped(buckets: Any, network_spec: DatasetSpec) -> None:
    put_feedback(
        buckets,
        "2026-03-10",
        "a.csv",
        [
            ("r1", -1, "2026-03-10T01:00:00Z"),
            ("", 1, "2026-03-10T01:00:00Z"),
            ("r2", 0, "2026-03-10T01:00:00Z"),
            ("r3", 1, "yesterday"),
        ],
    )
    buckets.put_object(Bucket=RAW, Key="network_data_feedback/ds=2026-03-10/b.csv", Body=b"id,verdict\nx,1\n")
    buckets.put_object(Bucket=RAW, Key="network_data_feedback/ds=2026-03-10/notes.txt", Body=b"ignored")
    counts = JoinCounts()
    read = feedback.read_feedback(buckets, RAW, network_spec, ["2026-03-10", "2026-03-11"], counts)
    assert read["request_id"].tolist() == ["r1"]
    assert counts.invalid_feedback_rows == 3 and counts.feedback_files == 1
    assert len(counts.bad_feedback_files) == 1 and "b.csv: missing column(s)" in counts.bad_feedback_files[0]
    assert counts.feedback_partitions == [f"s3://{RAW}/network_data_feedback/ds=2026-03-10/"]
    # Nothing is deleted: the files stay for someone to fix.
    assert len(storage.list_keys(buckets, RAW, "network_data_feedback/")) == 3


# --- the join ---------------------------------------------------------------------------------


def test_join_late_labels_duplicates_and_unknown_ids(buckets: Any, network_spec: DatasetSpec) -> None:
    """The three rules: a label days late still joins; the latest labelled_at wins (counted);
    labels for request ids the model never answered are counted and ignored."""
    monday = DAY - dt.timedelta(days=3)
    put_jsonl(buckets, hour_key(monday, "a.jsonl"), log_records(network_spec, ["old-1", "old-2"], at=monday))
    put_jsonl(buckets, hour_key(DAY, "b.jsonl"), log_records(network_spec, ["new-1", "new-2", "new-3"], seed=1))
    day = f"{DAY:%Y-%m-%d}"
    put_feedback(
        buckets,
        day,
        "part-1.csv",
        [
            ("old-1", -1, f"{day}T09:00:00Z"),  # three days late
            ("new-1", -1, f"{day}T10:00:00Z"),
            ("new-1", 1, f"{day}T12:00:00Z"),  # relabelled: this one wins
            ("new-2", 1, f"{day}T11:00:00Z"),
            ("nobody", 1, f"{day}T11:00:00Z"),  # unknown request id
        ],
    )
    put_feedback(buckets, day, "part-2.csv", [("new-2", 1, f"{day}T10:30:00Z")])  # older duplicate, same label
    result = window(buckets, network_spec, [day])
    joined = result.frame.set_index("request_id")
    assert sorted(joined.index) == ["new-1", "new-2", "old-1"]
    assert joined.loc["new-1", TRUE_LABEL] == 1 and joined.loc["old-1", TRUE_LABEL] == -1
    assert joined.loc["old-1", "timestamp"].startswith(f"{monday:%Y-%m-%d}")
    counts = result.counts
    assert (counts.feedback_rows, counts.duplicate_labels, counts.relabelled) == (6, 2, 1)
    assert (counts.labelled_requests, counts.unknown_request_ids, counts.labelled_rows) == (4, 1, 3)


def test_labels_older_than_the_lookback_count_as_unknown(buckets: Any, network_spec: DatasetSpec) -> None:
    long_ago = DAY - dt.timedelta(days=9)
    put_jsonl(buckets, hour_key(long_ago, "a.jsonl"), log_records(network_spec, ["ancient"], at=long_ago))
    day = f"{DAY:%Y-%m-%d}"
    put_feedback(buckets, day, "f.csv", [("ancient", 1, f"{day}T09:00:00Z")])
    assert window(buckets, network_spec, [day], lookback_days=7).counts.unknown_request_ids == 1
    assert window(buckets, network_spec, [day], lookback_days=10).counts.labelled_rows == 1


def test_equal_labelled_at_keeps_the_later_arrival() -> None:
    frame = pd.DataFrame(
        {
            "request_id": ["x", "x"],
            TRUE_LABEL: [1, -1],
            "labelled_at": pd.to_datetime(["2026-03-10T10:00:00Z"] * 2),
            "order": [0, 1],
        }
    )
    counts = JoinCounts()
    latest = feedback.latest_labels(frame, counts)
    assert latest[TRUE_LABEL].tolist() == [-1] and (counts.duplicate_labels, counts.relabelled) == (1, 1)


def test_both_log_layouts_formats_and_only_this_model(buckets: Any, network_spec: DatasetSpec) -> None:
    """Per-model and legacy partitions, jsonl and parquet; other models and bad objects left out."""
    records = log_records(network_spec, [f"r{i}" for i in range(6)])
    put_jsonl(buckets, hour_key(DAY, "serving.jsonl"), records[:2])
    put_parquet(buckets, hour_key(DAY, "batch.parquet"), [{**r, "source": "batch"} for r in records[2:4]])
    legacy = [records[4], {**records[5], "model_name": "other_model"}]
    put_jsonl(buckets, hour_key(DAY, "legacy.jsonl", model=None), legacy)
    put_jsonl(buckets, hour_key(DAY, "broken.jsonl"), [{"request_id": "r9", "model_name": MODEL}])
    buckets.put_object(Bucket=LAKE, Key=hour_key(DAY, "garbage.parquet"), Body=b"not parquet")
    # Another model's own partition is not even listed.
    put_jsonl(buckets, hour_key(DAY, "x.jsonl", model="other_model"), [{**records[0], "model_name": "other_model"}])
    day = f"{DAY:%Y-%m-%d}"
    put_feedback(buckets, day, "f.csv", [(f"r{i}", 1, f"{day}T23:00:00Z") for i in [*range(6), 9]])
    result = window(buckets, network_spec, [day])
    assert sorted(result.frame["request_id"]) == ["r0", "r1", "r2", "r3", "r4"]
    assert result.frame.set_index("request_id")["source"].to_dict() == {
        "r0": None,
        "r1": None,
        "r2": "batch",
        "r3": "batch",
        "r4": None,
    }
    assert result.counts.prediction_objects == 3
    assert len(result.counts.bad_prediction_objects) == 2
    assert any(
        "missing column(s) ['model_version', 'label', 'probability']" in m for m in result.counts.bad_prediction_objects
    )
    assert result.counts.unknown_request_ids == 2  # r5 (another model's) and r9 (in the broken object)


def test_shadow_columns_are_read_when_present(buckets: Any, network_spec: DatasetSpec) -> None:
    records = [
        {**r, "role": "baseline", "shadow_model_version": "4", "shadow_label": -1, "shadow_probability": 0.9}
        for r in log_records(network_spec, ["s1", "s2"])
    ]
    put_jsonl(buckets, hour_key(DAY, "shadow.jsonl"), records)
    day = f"{DAY:%Y-%m-%d}"
    put_feedback(buckets, day, "f.csv", [("s1", 1, f"{day}T23:00:00Z"), ("s2", -1, f"{day}T23:00:00Z")])
    frame = window(buckets, network_spec, [day]).frame
    assert frame["shadow_model_version"].tolist() == ["4", "4"] and frame["shadow_label"].tolist() == [-1, -1]
    assert frame["role"].tolist() == ["baseline", "baseline"]


def test_a_repeated_prediction_record_counts_once(buckets: Any, network_spec: DatasetSpec) -> None:
    record = log_records(network_spec, ["dup"])[0]
    put_jsonl(buckets, hour_key(DAY, "a.jsonl"), [record])
    put_jsonl(buckets, hour_key(DAY, "b.jsonl"), [{**record, "timestamp": (DAY + dt.timedelta(minutes=5)).isoformat()}])
    day = f"{DAY:%Y-%m-%d}"
    put_feedback(buckets, day, "f.csv", [("dup", 1, f"{day}T23:00:00Z")])
    result = window(buckets, network_spec, [day])
    assert result.counts.labelled_rows == 1 and result.counts.duplicate_predictions == 1
    assert result.frame["timestamp"].iloc[0] == record["timestamp"]


def test_no_feedback_reads_no_prediction_log(buckets: Any, network_spec: DatasetSpec) -> None:
    put_jsonl(buckets, hour_key(DAY, "a.jsonl"), log_records(network_spec, ["a"]))
    result = window(buckets, network_spec, [f"{DAY:%Y-%m-%d}"])
    assert result.frame.empty and result.counts.prediction_objects == 0


def test_log_keys_covers_exactly_the_hours_of_the_window(buckets: Any, network_spec: DatasetSpec) -> None:
    for hour in (DAY - dt.timedelta(hours=1), DAY, DAY + dt.timedelta(hours=5), DAY + dt.timedelta(hours=6)):
        put_jsonl(buckets, hour_key(hour, "a.jsonl"), log_records(network_spec, ["a"], at=hour))
    keys = feedback.log_keys(buckets, LAKE, MODEL, DAY, DAY + dt.timedelta(hours=6))
    assert keys == [hour_key(DAY, "a.jsonl"), hour_key(DAY + dt.timedelta(hours=5), "a.jsonl")]


# --- retraining on what was learned ----------------------------------------------------------


def test_training_frame_is_served_inputs_with_true_labels(buckets: Any, network_spec: DatasetSpec) -> None:
    records = log_records(network_spec, [f"t{i}" for i in range(50)], version="3")
    put_jsonl(buckets, hour_key(DAY, "a.jsonl"), records[:30])
    put_jsonl(
        buckets, hour_key(DAY + dt.timedelta(hours=2), "b.jsonl"), [{**r, "model_version": "4"} for r in records[30:]]
    )
    day, next_day = f"{DAY:%Y-%m-%d}", f"{DAY + dt.timedelta(days=1):%Y-%m-%d}"
    truth = {r["request_id"]: (-1 if i % 3 else 1) for i, r in enumerate(records)}
    put_feedback(buckets, day, "f.csv", [(rid, -label, f"{day}T20:00:00Z") for rid, label in truth.items()])
    put_feedback(buckets, next_day, "f.csv", [(rid, label, f"{next_day}T08:00:00Z") for rid, label in truth.items()])
    put_feedback(buckets, next_day, "g.csv", [("stranger", 1, f"{next_day}T08:00:00Z")])
    frame, lineage = feedback.feedback_training_frame(
        buckets,
        raw_bucket=RAW,
        lake_bucket=LAKE,
        spec=network_spec,
        model_name=MODEL,
        feedback_days=[day, next_day],
        predictions_from=DAY - dt.timedelta(days=7),
        predictions_to=DAY + dt.timedelta(days=2),
    )
    assert list(frame.columns) == network_spec.column_names
    assert frame.dtypes.astype(str).to_dict() == network_spec.dtypes
    assert len(frame) == 50
    # Served inputs (from the log) with the latest label (from the second day).
    by_row = {tuple(int(r[n]) for n in network_spec.feature_names): truth[r["request_id"]] for r in records}
    for row in frame.itertuples(index=False):
        assert by_row[tuple(row[:-1])] == row[-1]
    assert lineage == {
        "feedback_partitions": [
            f"s3://{RAW}/network_data_feedback/ds={day}/",
            f"s3://{RAW}/network_data_feedback/ds={next_day}/",
        ],
        "feedback_files": 3,
        "feedback_rows": 101,
        "duplicate_labels": 50,
        "unknown_request_ids": 1,
        "invalid_feedback_rows": 0,
        "training_rows": 50,
        "positive_share": pytest.approx(33 / 50),  # -1 (phishing) is the positive class
        "model_versions": ["3", "4"],
    }


def test_training_frame_needs_the_features(buckets: Any, network_spec: DatasetSpec) -> None:
    with pytest.raises(FeedbackError, match="with_features=True"):
        feedback.training_frame(window(buckets, network_spec, [f"{DAY:%Y-%m-%d}"]), network_spec)


def test_days_ending() -> None:
    assert feedback.days_ending("2026-03-01", 3) == ["2026-02-27", "2026-02-28", "2026-03-01"]
    with pytest.raises(ValueError, match="at least 1"):
        feedback.days_ending("2026-03-01", 0)
