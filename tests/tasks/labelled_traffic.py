"""Test helpers: prediction-log objects as the serving app and batch scoring write them, and feedback drops."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.datagen import generate
from tasks.dataset_spec import DatasetSpec

RAW, LAKE = "network-security-raw", "network-security-lake"
MODEL = "network_security"
DAY = dt.datetime(2026, 3, 10, tzinfo=dt.UTC)


def log_records(
    spec: DatasetSpec, ids: list[str], version: str = "3", model: str = MODEL, at: dt.datetime = DAY, seed: int = 0
) -> list[dict[str, Any]]:
    """Prediction-log records as the serving app writes them (keys in its order)."""
    features = generate(spec, len(ids), seed=seed)[spec.feature_names]
    rng = np.random.default_rng(seed)
    records = []
    for request_id, row, p in zip(ids, features.to_dict(orient="records"), rng.random(len(ids)), strict=True):
        records.append(
            {
                "request_id": request_id,
                "timestamp": at.isoformat(timespec="milliseconds"),
                "model_name": model,
                "model_version": version,
                **{k: int(v) for k, v in row.items()},
                "label": spec.positive_class if p >= 0.5 else spec.negative_class,
                "probability": float(p),
            }
        )
    return records


def put_jsonl(s3: Any, key: str, records: list[dict[str, Any]]) -> None:
    body = "\n".join(json.dumps(r) for r in records).encode()
    s3.put_object(Bucket=LAKE, Key=key, Body=body)


def put_parquet(s3: Any, key: str, records: list[dict[str, Any]]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    s3.put_object(Bucket=LAKE, Key=key, Body=buffer.getvalue())


def hour_key(at: dt.datetime, name: str, model: str | None = MODEL) -> str:
    base = f"predictions/{model}" if model else "predictions"
    return f"{base}/dt={at:%Y-%m-%d}/{at:%H}/{name}"


def put_feedback(s3: Any, day: str, name: str, rows: list[tuple[str, Any, str]]) -> None:
    frame = pd.DataFrame(rows, columns=["request_id", "Result", "labelled_at"])
    s3.put_object(Bucket=RAW, Key=f"network_data_feedback/ds={day}/{name}", Body=frame.to_csv(index=False).encode())
