"""A quality-triggered run trains on the newest drop plus the labelled feedback window (tasks.pipeline.transform)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tasks import pipeline, storage
from tasks.config import Settings
from tasks.datagen import generate
from tasks.dataset_spec import DatasetSpec
from tasks.ingest import content_hash
from tasks.layout import DayLayout
from tasks.plan import plan_run
from tests.tasks.labelled_traffic import DAY, MODEL, RAW, hour_key, log_records, put_feedback, put_jsonl

DS = f"{DAY:%Y-%m-%d}"


def _snapshot(s3: Any, spec: DatasetSpec, rows: int) -> None:
    layout = DayLayout(Settings(), spec, DS)
    frame = generate(spec, rows, seed=5)
    storage.write_parquet(s3, layout.snapshot, frame)
    storage.put_json(
        s3, layout.snapshot_manifest, {"snapshot_uri": layout.snapshot.uri, "content_sha256": content_hash(frame)}
    )


def _plan(conf: dict) -> Any:
    return plan_run(Settings(), {"ds": DS, **conf}, DS, "manual", ["network_security"])


def test_the_feedback_window_joins_the_training_data_once_per_request_with_its_lineage(buckets, network_spec):
    _snapshot(buckets, network_spec, 400)
    records = log_records(network_spec, [f"r{i}" for i in range(120)])
    put_jsonl(buckets, hour_key(DAY, "a.jsonl"), records)
    labels = [(r["request_id"], 1 if i % 2 else -1, f"{DS}T20:00:00Z") for i, r in enumerate(records)]
    put_feedback(buckets, DS, "f.csv", labels + labels[:30] + [("unknown", 1, f"{DS}T20:00:00Z")])  # 30 duplicates
    feedback = {
        "model_name": MODEL,
        "feedback_days": [DS],
        "predictions_from": (DAY - dt.timedelta(days=7)).isoformat(),
        "predictions_to": (DAY + dt.timedelta(days=1)).isoformat(),
    }

    plain = pipeline.transform(_plan({}), buckets)
    learned = pipeline.transform(
        _plan({"reason": "quality: ...", "signals": ["quality"], "feedback": feedback}), buckets
    )

    assert "feedback" not in plain and plain["train_rows"] + plain["test_rows"] == 400
    assert learned["train_rows"] + learned["test_rows"] == 400 + 120  # deduplicated by request id
    lineage = learned["feedback"]
    assert lineage["feedback_partitions"] == [f"s3://{RAW}/network_data_feedback/ds={DS}/"]
    assert (lineage["training_rows"], lineage["duplicate_labels"], lineage["unknown_request_ids"]) == (120, 30, 1)
    manifest = storage.get_json(buckets, storage.parse_s3_uri(learned["manifest_uri"]))
    assert manifest["feedback"] == lineage
    run_lineage = _plan({"feedback": feedback}).training_lineage(learned, "s3://lake/validation.json")
    assert run_lineage["feedback"]["training_rows"] == 120  # what lineage.json of the MLflow run records
