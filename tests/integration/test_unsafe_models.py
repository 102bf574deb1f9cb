"""A hostile model version as ``champion`` in the real registry (the private stack's MLflow server).

The version is a cloudpickle "model" whose ``__reduce__`` writes a sentinel file: whatever
unpickles it runs that code on the worker (which holds AWS credentials). The registry's
loaders (challenger/champion scoring, the drift reference scoring) and the drift DAG run
with ``dag.test()`` must refuse it with its format named, and the sentinel must never
appear. Own registered model (``NS_MODEL_NAME``), own day (2026-10-02).
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import drift, storage
from tasks.config import DRIFT_DAG_ID, Settings
from tasks.datagen import generate
from tasks.dataset_spec import load_spec
from tasks.gate import GateRule
from tasks.model_io import SKOPS_TRUSTED_TYPES, UnsafeModel, load_model
from tests.dag_runs import run_dag

pytestmark = pytest.mark.integration

MODEL = "ns_unsafe_model_test"
SPEC = load_spec("network_security")
DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
SNAPSHOT = f"snapshots/{SPEC.name}/ds=2026-10-01/data.parquet"


class WritesSentinel:
    """Unpickling this writes ``path``: the payload of a hostile model version."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('unpickled')",))


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", MODEL)
        patch.setenv("NS_DEPLOY_TARGETS", "")
        yield


@pytest.fixture(scope="module")
def tracking_uri(local_stack) -> str:
    import mlflow

    uri = local_stack["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("ns_unsafe_models")
    return uri


def _register(model: Any, **log_kwargs: Any) -> str:
    """Log ``model`` with the sklearn flavor (and the lineage drift reads), register it; its version."""
    import mlflow

    with mlflow.start_run():
        mlflow.log_dict({"snapshot_uris": [f"s3://{Settings().lake_bucket}/{SNAPSHOT}"]}, "lineage.json")
        # Explicit requirements: inferring them would unpickle the model in a subprocess.
        info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=MODEL, pip_requirements=["scikit-learn"], **log_kwargs
        )
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def versions(tracking_uri, s3, tmp_path_factory) -> dict[str, Any]:
    """v1: a real skops pipeline; v2: the cloudpickle sentinel writer, set as champion."""
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    frame = generate(SPEC, 600, seed=21)
    storage.write_parquet(s3, storage.S3Location(Settings().lake_bucket, SNAPSHOT), frame)
    pipeline = LogisticRegression(max_iter=200).fit(frame[SPEC.feature_names], frame[SPEC.target.name])
    safe = _register(pipeline, serialization_format="skops", skops_trusted_types=SKOPS_TRUSTED_TYPES)
    sentinel = tmp_path_factory.mktemp("unsafe") / "sentinel"
    hostile = _register(WritesSentinel(sentinel), serialization_format="cloudpickle")
    MlflowClient(tracking_uri).set_registered_model_alias(MODEL, "champion", hostile)
    return {"safe": safe, "hostile": hostile, "sentinel": sentinel, "test": frame}


def _champion(tracking_uri: str) -> str | None:
    from mlflow import MlflowClient

    from tasks.registry import alias_version

    return alias_version(MlflowClient(tracking_uri), MODEL, "champion")


def test_the_loader_refuses_the_champion_naming_its_format(tracking_uri, versions):
    assert load_model(tracking_uri, MODEL, versions["safe"]).predict(versions["test"][SPEC.feature_names]).size

    with pytest.raises(UnsafeModel) as err:
        load_model(tracking_uri, MODEL, versions["hostile"])

    assert f"model '{MODEL}' version {versions['hostile']} is serialised as 'cloudpickle'" in str(err.value)
    assert not versions["sentinel"].exists()


def test_champion_scoring_in_evaluation_refuses_it(tracking_uri, versions):
    from tasks.registry import evaluate_challenger

    with pytest.raises(UnsafeModel, match=f"version {versions['hostile']} is serialised as 'cloudpickle'"):
        evaluate_challenger(
            test=versions["test"],
            spec=SPEC,
            rule=GateRule(),
            tracking_uri=tracking_uri,
            model_name=MODEL,
            training={"model_version": versions["safe"]},
            data={},
            trigger=None,
        )
    assert not versions["sentinel"].exists()
    assert _champion(tracking_uri) == versions["hostile"]  # evaluation moves no alias


def test_drift_reference_scoring_refuses_it(tracking_uri, versions, s3):
    champion = drift.champion_reference(tracking_uri, MODEL)
    assert champion["model_version"] == versions["hostile"]

    with pytest.raises(UnsafeModel, match="serialised as 'cloudpickle'"):
        drift.reference_frame(s3, tracking_uri, champion, SPEC)
    assert not versions["sentinel"].exists()


def _log_predictions(s3, version: str, hour: dt.datetime, rows: int) -> None:
    """A served hour of the hostile champion, in the legacy log layout every reader reads."""
    features = generate(SPEC, rows, seed=22)[SPEC.feature_names]
    table = pa.table(
        {
            "request_id": [f"unsafe-{i}" for i in range(rows)],
            "timestamp": [(hour + dt.timedelta(seconds=i)).isoformat() for i in range(rows)],
            "model_name": [MODEL] * rows,
            "model_version": [version] * rows,
            **{name: pa.array(features[name].to_numpy()) for name in SPEC.feature_names},
            "label": [SPEC.positive_class] * rows,
            "probability": pa.array([0.5] * rows, pa.float32()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    key = f"predictions/dt={hour:%Y-%m-%d}/{hour:%H}/unsafe-{version}.parquet"
    storage.put_bytes(s3, storage.S3Location(Settings().lake_bucket, key), buffer.getvalue())


def test_the_drift_dag_refuses_the_champion_and_nothing_runs_its_code(tracking_uri, versions, s3, capfd):
    _log_predictions(s3, versions["hostile"], DAY.replace(hour=10), rows=600)

    report = run_dag(DRIFT_DAG_ID, DAY.replace(hour=11), conf={"window_hours": 3})

    assert not versions["sentinel"].exists(), "the drift check unpickled the champion"
    assert report.state == "failed"
    assert report.task_states["check_drift[network_security]"] == "failed", report.task_states
    assert report.task_states.get("trigger_retraining[network_security]") != "success"
    output = capfd.readouterr()
    logs = output.out + output.err
    assert f"model '{MODEL}' version {versions['hostile']} is serialised as 'cloudpickle'" in logs
    assert _champion(tracking_uri) == versions["hostile"]
