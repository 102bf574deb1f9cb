"""Test helper: predictions of a registered model logged as the model server logs them."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from tasks.config import Settings
from tasks.datagen import DriftKnob, generate
from tasks.dataset_spec import DatasetSpec


def log_scored_traffic(
    s3: Any,
    tracking_uri: str,
    spec: DatasetSpec,
    model: str,
    version: str,
    hour: dt.datetime,
    rows: int,
    seed: int,
    knob: DriftKnob | None = None,
) -> Any:
    """Score ``rows`` generated records with ``model`` v``version`` and write them, spread over
    ``hour``, through the serving app's own writer (``serving.prediction_log.PredictionLog``).

    Returns:
        What was served, as ``tasks.traffic.ServedTraffic.predictions`` has it (``request_id``,
        ``served_at``, ..., ``true_label``: the generated label), for ``tasks.datagen.label_feedback``.
    """
    import mlflow
    import mlflow.sklearn
    import pandas as pd

    from serving.prediction_log import PredictionLog

    mlflow.set_tracking_uri(tracking_uri)
    pipeline = mlflow.sklearn.load_model(f"models:/{model}/{version}")
    frame = generate(spec, rows, seed=seed, knob=knob)
    features = frame[spec.feature_names]
    positive = list(pipeline.classes_).index(spec.positive_class)
    probabilities = pipeline.predict_proba(features)[:, positive]
    ids = [uuid.uuid4().hex for _ in range(rows)]
    times = [hour + dt.timedelta(seconds=3000 * i / rows) for i in range(rows)]
    labels = [spec.positive_class if p >= 0.5 else spec.negative_class for p in probabilities]
    log = PredictionLog(s3, bucket=Settings().lake_bucket, prefix="predictions")
    log.start()
    log.log(
        {
            "request_id": ids[i],
            "timestamp": times[i].isoformat(timespec="milliseconds"),
            "model_name": model,
            "model_version": version,
            **{k: int(v) for k, v in row.items()},
            "label": labels[i],
            "probability": float(p),
        }
        for i, (row, p) in enumerate(zip(features.to_dict(orient="records"), probabilities, strict=True))
    )
    log.close()
    assert log.stats()["written"] == rows
    return pd.DataFrame(
        {
            "request_id": ids,
            "served_at": pd.to_datetime(times, utc=True),
            "model_name": model,
            "model_version": version,
            "label": labels,
            "probability": probabilities,
            "true_label": frame[spec.target.name].to_numpy(),
        }
    )
