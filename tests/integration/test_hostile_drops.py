"""A drop over the dataset spec's limits, through the training DAG with ``dag.test()`` (moto + MLflow).

The default ``network_security`` spec allows 1,000 columns; a file of 1,500 columns lands
in a sub-folder of the day next to a good file of the same name. Ingestion rejects it from
its header (naming the limit), the offending file is quarantined under its own relative
path, nothing downstream runs and the champion stays where it was. The other limits
(bytes, rows, table bytes) are exercised at the tasks level with small limits
(tests/tasks/test_ingest.py); their hand-measured large drops are in the README.
"""

from __future__ import annotations

import io

import pandas as pd
import pytest

from tasks import storage
from tasks.config import TRAINING_DAG_ID, Settings
from tasks.datagen import generate
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout
from tasks.model_io import SKOPS_TRUSTED_TYPES
from tests.dag_runs import run_dag

pytestmark = pytest.mark.integration

MODEL = "ns_hostile_drop_test"
SPEC = load_spec("network_security")
DS = "2026-10-05"


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", MODEL)
        patch.setenv("NS_DEPLOY_TARGETS", "")
        yield


@pytest.fixture(scope="module")
def champion(local_stack) -> str:
    """A champion registered by hand (a skops pipeline): the version the rejected run must not move."""
    import mlflow
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    uri = local_stack["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("ns_hostile_drops")
    frame = generate(SPEC, 300, seed=31)
    model = LogisticRegression(max_iter=200).fit(frame[SPEC.feature_names], frame[SPEC.target.name])
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=MODEL,
            serialization_format="skops",
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
        )
    version = str(info.registered_model_version)
    MlflowClient(uri).set_registered_model_alias(MODEL, "champion", version)
    return version


def _csv(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def test_a_drop_over_max_columns_is_rejected_quarantined_and_the_champion_kept(s3, champion, local_stack):
    from mlflow import MlflowClient

    layout = DayLayout(Settings(), SPEC, DS)
    good = generate(SPEC, 600, seed=32)
    extra = pd.DataFrame(
        0, index=good.index, columns=[f"export_field_{i:04d}" for i in range(1500 - len(SPEC.columns))]
    )
    wide = pd.concat([good, extra], axis=1)
    files = {"a/part-0000.csv": _csv(good), "b/part-0000.csv": _csv(wide)}
    storage.delete_prefix(s3, layout.raw_prefix.bucket, layout.raw_prefix.key)
    for name, body in files.items():
        storage.put_bytes(s3, layout.raw_prefix.child(name), body)
    versions_before = MlflowClient(local_stack["MLFLOW_TRACKING_URI"]).search_model_versions(f"name='{MODEL}'")

    report = run_dag(TRAINING_DAG_ID, DS)

    assert report.state == "failed"
    assert report.task_states["ingest"] == "failed", report.task_states
    assert report.task_states["validate"] != "success" and report.task_states["train"] != "success"
    note = storage.get_json(s3, layout.quarantine_dir.child("reason.json"))
    offending = layout.raw_prefix.child("b/part-0000.csv")
    assert note["stage"] == "ingest"
    assert note["reason"].startswith(f"raw file {offending.key} has 1,500 columns, over limits.max_columns = 1,000")
    assert note["raw_files"] == [offending.uri]
    # Kept under its path below the day: b/part-0000.csv, not part-0000.csv (a/ has one too).
    assert note["quarantined_files"] == [layout.quarantine_dir.child("b/part-0000.csv").uri]
    assert storage.get_bytes(s3, layout.quarantine_dir.child("b/part-0000.csv")) == files["b/part-0000.csv"]
    assert storage.list_keys(s3, layout.snapshot_dir.bucket, layout.snapshot_dir.key + "/") == []
    client = MlflowClient(local_stack["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert len(client.search_model_versions(f"name='{MODEL}'")) == len(versions_before)
