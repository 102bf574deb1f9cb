"""Fixtures of the model-server tests: a real registry with two versions, an in-process S3, the app.

The registry is a sqlite MLflow store under a temporary folder holding two versions of
a small real pipeline (preprocessor + logistic regression) logged exactly as
``tasks/train.py`` logs them (skops, ``SKOPS_TRUSTED_TYPES``); ``champion`` points at v1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import mlflow
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from mlflow.models import infer_signature
from moto import mock_aws
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from serving.app import create_app
from serving.config import ServingSettings
from serving.model_store import ModelHandle, ModelStore
from serving.prediction_log import PredictionLog
from tasks.datagen import generate
from tasks.dataset_spec import DatasetSpec, load_spec
from tasks.model_io import SKOPS_TRUSTED_TYPES
from tasks.transform import build_preprocessor

MODEL_NAME = "network_security"
FLOWS_MODEL = "intrusion_flows"  # a second, differently shaped model, served beside the first
API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
LOG_BUCKET = "network-security-lake"
PIP_REQUIREMENTS = ["scikit-learn", "skops"]


@dataclass(frozen=True)
class Registry:
    """The test registry: where it is and what each version is."""

    tracking_uri: str
    model_name: str
    pipelines: dict[str, Pipeline]  # version -> the fitted pipeline that was logged
    content_hashes: dict[str, str]  # version -> training-data hash recorded for it
    features: pd.DataFrame  # rows to score (the training features)
    flows_pipelines: dict[str, Pipeline]  # the same for FLOWS_MODEL (intrusion_flows dataset)
    flows_features: pd.DataFrame

    def move_alias(self, alias: str, version: str, model: str | None = None) -> None:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        client.set_registered_model_alias(model or self.model_name, alias, version)


@pytest.fixture(scope="session")
def spec() -> DatasetSpec:
    return load_spec("network_security")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, spec: DatasetSpec) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; put back what the session had.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment_id = mlflow.create_experiment("serving-tests", artifact_location=(root / "artifacts").as_uri())
        frame = generate(spec, 400, seed=1)
        features, target = frame[spec.feature_names], frame[spec.target.name]
        client = MlflowClient(tracking_uri=tracking_uri)
        pipelines, hashes = {}, {}
        # v2 is deliberately different (strong regularisation), so a reload visibly changes answers.
        for regularisation in (1.0, 0.02):
            pipeline = Pipeline(
                [
                    ("preprocess", build_preprocessor(spec)),
                    ("model", LogisticRegression(C=regularisation, max_iter=500)),
                ]
            ).fit(features, target)
            content_hash = hashlib.sha256(f"training data C={regularisation}".encode()).hexdigest()
            with mlflow.start_run(experiment_id=experiment_id):
                mlflow.log_dict({"content_hashes": [content_hash]}, "lineage.json")
                info = mlflow.sklearn.log_model(
                    pipeline,
                    name="model",
                    serialization_format="skops",
                    skops_trusted_types=SKOPS_TRUSTED_TYPES,
                    signature=infer_signature(features.head(50), pipeline.predict(features.head(50))),
                    input_example=features.head(3),
                    registered_model_name=MODEL_NAME,
                    # Given, not inferred: inference runs a subprocess for seconds and changes nothing served.
                    pip_requirements=PIP_REQUIREMENTS,
                )
            version = str(info.registered_model_version)
            if version == "1":
                # As tasks/train.py tags it; v2 keeps the hash in the run's lineage only (the fallback).
                client.set_model_version_tag(MODEL_NAME, version, "content_sha256", content_hash)
            pipelines[version], hashes[version] = pipeline, content_hash
        client.set_registered_model_alias(MODEL_NAME, "champion", "1")
        flows_spec = load_spec(FLOWS_MODEL)
        flows = generate(flows_spec, 300, seed=2)
        flows_features, flows_pipelines = flows[flows_spec.feature_names], {}
        for regularisation in (1.0, 0.01):
            pipeline = Pipeline(
                [("preprocess", build_preprocessor(flows_spec)), ("model", LogisticRegression(C=regularisation))]
            ).fit(flows_features, flows[flows_spec.target.name])
            with mlflow.start_run(experiment_id=experiment_id):
                info = mlflow.sklearn.log_model(
                    pipeline,
                    name="model",
                    serialization_format="skops",
                    skops_trusted_types=SKOPS_TRUSTED_TYPES,
                    registered_model_name=FLOWS_MODEL,
                    pip_requirements=PIP_REQUIREMENTS,
                )
            flows_pipelines[str(info.registered_model_version)] = pipeline
        client.set_registered_model_alias(FLOWS_MODEL, "champion", "1")
        yield Registry(tracking_uri, MODEL_NAME, pipelines, hashes, features, flows_pipelines, flows_features)
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it again


@pytest.fixture(scope="session", autouse=True)
def loaded_versions_are_reused() -> Iterator[None]:
    """Each registered version is downloaded, loaded and compiled once per session, not once per app.

    A version's artifacts never change in the registry, so a second load of the same
    version (same store settings) would produce the same model; the tests of loading
    itself (refused formats, other labels) fail before anything is kept.
    """
    loaded: dict[tuple[Any, ...], ModelHandle] = {}
    real_load = ModelStore.load

    def load(self: ModelStore, version: str) -> ModelHandle:
        key = (self.tracking_uri, self.model_name, str(version), self.alias, tuple(self.expected_classes))
        if key not in loaded:
            loaded[key] = real_load(self, version)
        return dataclasses.replace(loaded[key], loaded_at=dt.datetime.now(dt.UTC))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelStore, "load", load)
        yield


@pytest.fixture
def champion_is_v1(registry: Registry) -> Iterator[Registry]:
    """The registry, with ``champion`` put back on v1 (of both models) after the test whatever it did."""
    for model in (registry.model_name, FLOWS_MODEL):
        registry.move_alias("champion", "1", model)
    yield registry
    for model in (registry.model_name, FLOWS_MODEL):
        registry.move_alias("champion", "1", model)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A boto3 S3 client on moto's in-process mock, with the prediction-log bucket."""
    # An emulator endpoint or a profile from the shell would send requests past the mock.
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=LOG_BUCKET)
        yield client


def make_settings(registry: Registry, **overrides: Any) -> ServingSettings:
    values: dict[str, Any] = {
        "tracking_uri": registry.tracking_uri,
        "model_name": registry.model_name,
        "api_key": API_KEY,
        "admin_api_key": ADMIN_KEY,
        "prediction_log_bucket": LOG_BUCKET,
        "prediction_log_flush_seconds": 0.05,
        "max_batch_size": 50,
    }
    values.update(overrides)
    return ServingSettings(**values)


def make_log(client: Any, **overrides: Any) -> PredictionLog:
    values: dict[str, Any] = {
        "bucket": LOG_BUCKET,
        "prefix": "predictions",
        "flush_seconds": 0.05,
        "batch_size": 500,
        "retry_initial_seconds": 0.01,
        "retry_max_seconds": 0.05,
    }
    values.update(overrides)
    return PredictionLog(client, **values)


@pytest.fixture
def settings(champion_is_v1: Registry) -> ServingSettings:
    return make_settings(champion_is_v1)


@contextlib.contextmanager
def serving_client(app: Any, *, ready: bool = True, timeout: float = 30.0) -> Iterator[TestClient]:
    """A TestClient running the app's lifespan; with ``ready``, once ``/ready`` answers 200.

    The model loads in the background at start-up, so a test that scores waits for it.
    """
    with TestClient(app) as client:
        deadline = time.monotonic() + timeout
        while ready and client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, f"not ready within {timeout} s: {client.get('/ready').json()}"
            time.sleep(0.02)
        yield client


@pytest.fixture
def api(settings: ServingSettings, aws: Any) -> Iterator[TestClient]:
    """The app on the test registry and the mocked S3, its lifespan running and its model loaded."""
    app = create_app(settings, prediction_log=make_log(aws))
    with serving_client(app) as client:
        yield client


@pytest.fixture
def auth() -> dict[str, str]:
    return {"X-API-Key": API_KEY}


@pytest.fixture
def admin() -> dict[str, str]:
    return {"X-API-Key": ADMIN_KEY}


def loaded_store(registry: Registry) -> ModelStore:
    store = ModelStore(tracking_uri=registry.tracking_uri, model_name=registry.model_name)
    store.reload()
    return store


def record_of(features: pd.DataFrame, row: int) -> dict[str, Any]:
    """One request record: a row of the features as plain JSON values (ints stay ints)."""
    return {name: features[name].iloc[row].item() for name in features.columns}
