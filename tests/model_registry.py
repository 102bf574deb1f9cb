"""A small real MLflow registry for tests: one version of a real pipeline, logged as tasks/train.py logs it.

Used where a test needs the actual serving app (``serving.app.create_app``) answering for a
registered model, without the local stack: a sqlite tracking store under a temporary folder,
the dataset's preprocessor + logistic regression, skops with ``SKOPS_TRUSTED_TYPES``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TestRegistry:
    tracking_uri: str
    model_name: str
    version: str
    pipeline: Any  # the fitted pipeline that was logged
    features: Any  # rows it was trained on (a DataFrame of the spec's features)


def register_pipeline(root: Path, spec: Any, model_name: str = "network_security", rows: int = 300) -> TestRegistry:
    """Train, log and register one version under ``root`` and point ``champion`` at it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from tasks.datagen import generate
    from tasks.model_io import SKOPS_TRUSTED_TYPES
    from tasks.transform import build_preprocessor

    tracking_uri = f"sqlite:///{root}/mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri exports it: put it back after
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
        frame = generate(spec, rows, seed=1)
        features, target = frame[spec.feature_names], frame[spec.target.name]
        pipeline = Pipeline(
            [("preprocess", build_preprocessor(spec)), ("model", LogisticRegression(max_iter=500))]
        ).fit(features, target)
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.sklearn.log_model(
                pipeline,
                name="model",
                serialization_format="skops",
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
                signature=infer_signature(features.head(20), pipeline.predict(features.head(20))),
                registered_model_name=model_name,
                pip_requirements=["scikit-learn", "skops"],  # given: inference takes seconds and changes nothing
            )
        version = str(info.registered_model_version)
        MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(model_name, "champion", version)
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it again
    return TestRegistry(tracking_uri, model_name, version, pipeline, features)
