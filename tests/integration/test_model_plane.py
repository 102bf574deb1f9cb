"""Model plane: training, registry aliases and the gate, with ``dag.test()`` on the real stack.

The tests tell one story in order on a registered model of their own (``NS_MODEL_NAME``):
the first model is promoted, a degraded one is gated out, an equal one follows the rule,
a forced decision is logged, and an unreachable MLflow never moves the champion.
"""

from __future__ import annotations

import math
import sqlite3

import pytest

from tasks import storage
from tasks.config import TRAINING_DAG_ID, Settings
from tasks.datagen import DriftKnob, publish_drop
from tasks.dataset_spec import load_spec
from tasks.gate import decide
from tasks.layout import DayLayout
from tasks.train import git_sha, load_training_config
from tests.dag_runs import run_dag

pytestmark = pytest.mark.integration

MODEL = "ns_model_plane_test"
SPEC = load_spec("network_security")
ROWS = 2500


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", MODEL)
        patch.setenv("NS_DEPLOY_TARGETS", "")  # delivery has its own tests (test_delivery.py)
        yield


@pytest.fixture(scope="module")
def mlflow_client(local_stack):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(local_stack["MLFLOW_TRACKING_URI"])
    return MlflowClient()


def _alias(client, alias: str) -> str | None:
    from tasks.tracking import alias_version

    return alias_version(client, MODEL, alias)


def _promotions(local_stack) -> list[dict]:
    with sqlite3.connect(local_stack["NS_MONITORING_DB"]) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM promotion_log WHERE model_name = ? ORDER BY decided_at", (MODEL,))
        return [dict(row) for row in rows]


def _layout(ds: str) -> DayLayout:
    return DayLayout(Settings(), SPEC, ds)


def _run(s3, ds: str, knob: DriftKnob | None = None, conf: dict | None = None, publish: bool = True):
    if publish:
        publish_drop(s3, _layout(ds), rows=ROWS, knob=knob)
    return run_dag(TRAINING_DAG_ID, ds, conf=conf)


@pytest.fixture(scope="module")
def first_run(s3, local_stack, mlflow_client):
    report = _run(s3, "2026-07-01")
    assert report.succeeded, report.task_states
    return report


def test_first_run_promotes_the_first_model(first_run, mlflow_client, local_stack):
    evaluation = first_run.outputs["evaluate"]
    version = first_run.outputs["train"]["model_version"]
    assert evaluation["decision"] == "promote" and evaluation["champion_version"] is None
    assert first_run.task_states["release.complete"] == "success"
    assert first_run.task_states["keep_champion"] == "skipped"
    assert _alias(mlflow_client, "champion") == version
    assert _alias(mlflow_client, "challenger") == version
    assert _alias(mlflow_client, "previous_champion") is None
    (row,) = _promotions(local_stack)
    assert (row["model_version"], row["decision"], row["champion_version"]) == (version, "promote", None)
    assert math.isclose(row["challenger_metric"], evaluation["challenger_metrics"]["roc_auc"])


def test_the_run_emits_snapshot_and_champion_asset_events(first_run):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetModel.name, AssetEvent.extra)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_run_id == first_run.run_id)
            .all()
        )
    extras = dict(events)
    assert extras["network_security_snapshots"]["ds"] == "2026-07-01"
    assert extras["network_security_snapshots"]["content_hash"] == first_run.outputs["ingest"]["content_hash"]
    assert extras["network_security_champion"]["version"] == "1"
    assert extras["network_security_champion"]["model_name"] == MODEL


def test_training_run_records_lineage_candidates_and_evidence(first_run, mlflow_client):
    run_id = first_run.outputs["train"]["run_id"]
    run = mlflow_client.get_run(run_id)
    ingest = first_run.outputs["ingest"]
    assert run.data.tags["airflow_dag_id"] == TRAINING_DAG_ID
    assert run.data.tags["airflow_run_id"] == first_run.run_id
    assert run.data.tags["ds"] == "2026-07-01"
    assert run.data.tags["git_sha"] == git_sha()
    assert run.data.tags["gate_decision"] == "promote"
    assert {"test_roc_auc", "test_f1", "test_pr_auc", "cv_roc_auc_mean"} <= set(run.data.metrics)
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.source and ingest["snapshot_uri"] in inputs[0].dataset.source
    children = mlflow_client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert {c.data.tags["candidate"] for c in children} == {"logistic_regression", "random_forest", "gradient_boosting"}
    assert all("cv_roc_auc_mean" in c.data.metrics for c in children)
    artifacts = {a.path for a in mlflow_client.list_artifacts(run_id)}
    assert {"model_card.md", "lineage.json", "dataset_spec.json", "reference_stats.json", "evaluation"} <= artifacts
    plots = {a.path for a in mlflow_client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/roc_curve.png", "evaluation/pr_curve.png"} <= plots
    lineage = mlflow_client.download_artifacts(run_id, "lineage.json")
    assert ingest["content_hash"] in open(lineage).read()
    card = open(mlflow_client.download_artifacts(run_id, "model_card.md")).read()
    assert f"v{first_run.outputs['train']['model_version']}" in card and "promote" in card


def test_champion_alias_serves_the_logged_metrics(first_run, s3, mlflow_client):
    import mlflow.sklearn

    from tasks.evaluate import classification_metrics, positive_scores

    model = mlflow.sklearn.load_model(f"models:/{MODEL}@champion")
    test = storage.read_parquet(s3, storage.parse_s3_uri(first_run.outputs["transform"]["test_uri"]))
    features, truth = test[SPEC.feature_names], test[SPEC.target.name]
    metrics = classification_metrics(truth, model.predict(features), positive_scores(model, features, -1), -1)
    logged = mlflow_client.get_run(first_run.outputs["train"]["run_id"]).data.metrics
    for name, value in metrics.items():
        assert math.isclose(value, logged[f"test_{name}"], rel_tol=1e-9), name


def test_same_snapshot_and_seed_give_identical_metrics(first_run, s3, mlflow_client):
    again = _run(s3, "2026-07-01", publish=False)
    assert again.succeeded, again.task_states
    assert again.outputs["ingest"]["content_hash"] == first_run.outputs["ingest"]["content_hash"]
    assert again.outputs["train"]["model_version"] != first_run.outputs["train"]["model_version"]
    assert again.outputs["train"]["cv_metrics"] == first_run.outputs["train"]["cv_metrics"]
    assert again.outputs["evaluate"]["challenger_metrics"] == first_run.outputs["evaluate"]["challenger_metrics"]


def test_degraded_data_is_gated_out_and_the_champion_stays(first_run, s3, mlflow_client, local_stack):
    champion_before = _alias(mlflow_client, "champion")
    report = _run(s3, "2026-07-02", knob=DriftKnob(label_noise=0.35))

    assert report.succeeded, report.task_states  # a rejection ends the run cleanly
    evaluation = report.outputs["evaluate"]
    assert evaluation["decision"] == "reject"
    assert report.task_states["release.candidate"] == "skipped"
    assert report.task_states["keep_champion"] == "success"
    assert _alias(mlflow_client, "champion") == champion_before
    assert _alias(mlflow_client, "challenger") == report.outputs["train"]["model_version"]
    assert any("floor" in reason or "below the champion" in reason for reason in evaluation["reasons"])
    row = _promotions(local_stack)[-1]
    assert (row["model_version"], row["decision"]) == (report.outputs["train"]["model_version"], "reject")
    card = open(mlflow_client.download_artifacts(evaluation["run_id"], "model_card.md")).read()
    assert "reject" in card and evaluation["reasons"][0] in card


def test_equal_quality_data_follows_the_rule_and_records_the_trigger(first_run, s3, mlflow_client):
    champion_before = _alias(mlflow_client, "champion")
    conf = {"reason": "drift: PSI 0.31 on SSLfinal_State", "drift_report_uri": "s3://lake/drift/run-1/report.html"}
    report = _run(s3, "2026-07-03", conf=conf)

    assert report.succeeded, report.task_states
    evaluation = report.outputs["evaluate"]
    expected = decide(load_training_config().gate, evaluation["challenger_metrics"], evaluation["champion_metrics"])
    assert evaluation["champion_version"] == champion_before
    assert evaluation["decision"] == expected.decision
    new_champion = report.outputs["train"]["model_version"] if expected.promote else champion_before
    assert _alias(mlflow_client, "champion") == new_champion
    if expected.promote:
        assert _alias(mlflow_client, "previous_champion") == champion_before
    tags = mlflow_client.get_run(evaluation["run_id"]).data.tags
    assert tags["trigger_reason"] == conf["reason"]
    assert tags["drift_report_uri"] == conf["drift_report_uri"]


def test_forced_decision_needs_a_reason_and_is_logged(first_run, s3, mlflow_client, local_stack):
    refused = _run(s3, "2026-07-04", conf={"force_gate": "promote"})
    assert refused.task_states["plan_run"] == "failed"

    report = _run(
        s3,
        "2026-07-04",
        knob=DriftKnob(label_noise=0.35),
        conf={"force_gate": "promote", "force_reason": "incident 42: roll forward the relabelled model"},
    )
    assert report.succeeded, report.task_states
    evaluation = report.outputs["evaluate"]
    assert evaluation["decision"] == "forced_promote" and evaluation["forced"]
    assert _alias(mlflow_client, "champion") == report.outputs["train"]["model_version"]
    row = _promotions(local_stack)[-1]
    assert row["decision"] == "forced_promote" and "incident 42" in row["reason"]


def test_mlflow_unreachable_fails_clearly_and_never_moves_the_champion(
    first_run, s3, mlflow_client, capfd, monkeypatch
):
    champion_before = _alias(mlflow_client, "champion")
    monkeypatch.setenv("NS_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    report = _run(s3, "2026-07-05")

    assert report.state == "failed"
    assert report.task_states["start_training"] == "failed"  # the first step that needs MLflow
    assert report.task_states["train"] != "success"
    assert report.task_states.get("release.complete") != "success"
    output = capfd.readouterr()
    message = "MLflow tracking server http://127.0.0.1:9 is unreachable"
    assert (output.out + output.err).count(message) >= 3, "expected the first try and 2 retries"
    assert _alias(mlflow_client, "champion") == champion_before
