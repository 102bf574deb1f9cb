"""The serving app's answers for a frame of rows, in-process (TestClient), with an in-memory model.

The app is the real one (``serving.app.create_app``: request validation, the fast JSON lane,
the predictor its model store builds at load time); only the model comes from memory instead
of the MLflow registry, and the prediction log is off. Used by the batch-scoring test and by
``bench/batch_scoring.py --check-rows`` to compare batch scoring with what the server answers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from tasks.dataset_spec import DatasetSpec

API_KEY = "batch-scoring-check"


def serving_app(pipeline: Any, spec: DatasetSpec, version: str, max_batch_size: int) -> Any:
    """``create_app`` serving ``pipeline`` as ``version`` of the spec's model, no MLflow, no log."""
    from serving.app import create_app
    from serving.config import ServingSettings
    from serving.model_store import ModelHandle, ModelStore
    from serving.predictor import build_predictor

    settings = ServingSettings(
        tracking_uri="http://127.0.0.1:9",  # never contacted: the model is already loaded
        model_name=spec.name,
        dataset=spec.name,
        api_key=API_KEY,
        prediction_log_bucket="",
        max_batch_size=max_batch_size,
    )
    store = ModelStore(tracking_uri=settings.tracking_uri, model_name=spec.name, feature_columns=spec.features)
    # What ModelStore.load builds after downloading a version (predictor included).
    store.swap(
        ModelHandle(
            pipeline=pipeline,
            name=spec.name,
            version=version,
            run_id=None,
            training_data_sha256=None,
            loaded_at=dt.datetime.now(dt.UTC),
            predictor=build_predictor(pipeline, spec.features),
        )
    )
    return create_app(settings, store=store)


def serve_batches(
    pipeline: Any, spec: DatasetSpec, frame: pd.DataFrame, version: str, batch_size: int = 1000
) -> pd.DataFrame:
    """POST the rows of ``frame`` to ``/predict/batch`` in batches; the answers' labels and probabilities."""
    from fastapi.testclient import TestClient

    records = [
        {name: value.item() if hasattr(value, "item") else value for name, value in row.items()}
        for row in frame[spec.feature_names].to_dict(orient="records")
    ]
    answers = []
    with TestClient(serving_app(pipeline, spec, version, batch_size)) as client:
        for start in range(0, len(records), batch_size):
            response = client.post(
                "/predict/batch", json={"records": records[start : start + batch_size]}, headers={"X-API-Key": API_KEY}
            )
            response.raise_for_status()
            body = response.json()
            assert body["model_version"] == version
            answers.extend(body["predictions"])
    return pd.DataFrame(answers)[["label", "probability", "request_id"]]
