"""Model quality on live truth: the quality DAG with ``dag.test()`` on the real stack (moto + MLflow).

One story, in order, on a registered model of its own (``NS_MODEL_NAME``) and days of its own,
with the prediction log written by the serving app's own writer and the feedback drops
written by ``tasks.feedback.publish_feedback`` from what was served (every prediction labelled,
about two hours later, so each day's drop labels that day's traffic):

  day 1  50 labelled predictions                  -> check at day 2 00:00: skipped, too few labels
         normal traffic, v1, labelled             -> check at day 2 00:00: calm, no trigger
  day 2  concept drift (same features, reversed   -> drift check: PSI below the threshold, no trigger
         evidence), v1, labelled                  -> check at day 3 00:00: quality fell, one training run
                                                     ten more checks: still one run
         the queued run is executed: v2 trains on day 2's drop plus the labelled feedback (lineage)
  day 3  concept-drifted traffic, v2, labelled    -> check at day 4 00:00: quality recovered
  day 4  drift and the old concept, v2            -> drift check held (cooldown), quality check at day 5
                                                     00:00: one training run naming both reasons

Cooldowns are overridden by run params where the story compresses days into minutes.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest

from scripts import services
from tasks.config import DRIFT_DAG_ID, QUALITY_DAG_ID, TRAINING_DAG_ID, Settings
from tasks.datagen import DriftKnob, FeedbackKnob, label_feedback, publish_drop
from tasks.dataset_spec import load_spec
from tasks.feedback import publish_feedback
from tasks.layout import DayLayout
from tests.dag_runs import discard_queued_runs, queued_runs, run_dag, run_queued
from tests.traffic import log_scored_traffic

pytestmark = pytest.mark.integration

MODEL = "ns_quality_test"
SPEC = load_spec("network_security")
DAY1 = dt.datetime(2026, 10, 11, tzinfo=dt.UTC)
CONCEPT = DriftKnob(concept_drift=0.7)
LABELS = FeedbackKnob(labelled_share=1.0, delay_hours=2.0, delay_spread=0.2)


def day(n: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return DAY1 + dt.timedelta(days=n - 1, hours=hour, minutes=minute)


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", MODEL)
        patch.setenv("NS_DEPLOY_TARGETS", "")  # the checks read the log; serving is tested elsewhere
        yield


@pytest.fixture(scope="module")
def champion_v1(s3, local_stack):
    """The first champion, trained on the day before the story."""
    ds = f"{day(0):%Y-%m-%d}"
    publish_drop(s3, DayLayout(Settings(), SPEC, ds), rows=2500)
    report = run_dag(TRAINING_DAG_ID, ds)
    assert report.succeeded, report.task_states
    assert report.outputs["release.complete"]["champion_version"] == "1"
    return report


def serve_and_label(local_stack, version: str, hour: dt.datetime, rows: int, seed: int, knob=None) -> list[str]:
    """Served traffic in the prediction log and its feedback drop (every prediction, ~2 h later)."""
    s3 = services.s3_client(local_stack)
    served = log_scored_traffic(s3, local_stack["MLFLOW_TRACKING_URI"], SPEC, MODEL, version, hour, rows, seed, knob)
    feedback = label_feedback(served, SPEC, LABELS, seed=seed)
    return publish_feedback(s3, Settings().raw_bucket, SPEC, feedback, batch_id=f"{MODEL}-{seed}")


def check(when: dt.datetime, **params):
    report = run_dag(QUALITY_DAG_ID, when, conf=params)
    return report, report.outputs.get("decide_retraining[network_security]:decision")


def rows(local_stack, table: str) -> list[dict]:
    with sqlite3.connect(local_stack["NS_MONITORING_DB"]) as connection:
        connection.row_factory = sqlite3.Row
        found = connection.execute(f"SELECT * FROM {table} WHERE model_name = ? ORDER BY window_end", (MODEL,))  # noqa: S608
        return [dict(row) for row in found]


def quality_runs_queued() -> list[dict]:
    return [run for run in queued_runs(TRAINING_DAG_ID) if "quality__" in run["run_id"]]


def test_too_few_labels_skips_the_check_with_the_reason(champion_v1, local_stack):
    serve_and_label(local_stack, "1", day(1, 8), rows=50, seed=300)

    report, decision = check(day(2))

    assert report.succeeded, report.task_states
    assert report.task_states["check_quality[network_security]"] == "skipped" and decision is None
    assert report.task_states["trigger_retraining[network_security]"] == "skipped"
    row = rows(local_stack, "quality_check")[-1]
    assert row["decision"] == "skipped" and row["window_end"].startswith(f"{day(2):%Y-%m-%d}T00:00")
    assert "champion v1: 50 labelled rows (minimum 200)" in row["reason"] and "too little truth" in row["reason"]


def test_calm_feedback_no_trigger(champion_v1, s3, local_stack):
    serve_and_label(local_stack, "1", day(1, 10), rows=800, seed=301)

    report, decision = check(day(2))

    assert report.succeeded, report.task_states
    assert decision["outcome"] == "no_quality" and not decision["trigger"]
    summary = report.outputs["check_quality[network_security]"]
    assert summary["labelled_rows"] == 850 and not summary["degraded"]
    assert summary["live_metric"] > summary["holdout_metric"] - 0.05
    for uri in (summary["report_uri"], summary["summary_uri"]):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        assert key.startswith(f"quality/network_security/{report.run_id.replace(':', '_').replace('+', '_')}/")
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    assert report.outputs["check_quality[network_security]:_link_MLflowRunLink"] == summary["mlflow_run_url"]
    assert quality_runs_queued() == []
    assert rows(local_stack, "quality_check")[-1]["decision"] == "no_quality"


def test_concept_drift_below_the_psi_threshold_triggers_one_run_naming_quality(champion_v1, s3, local_stack, webhook):
    publish_drop(s3, DayLayout(Settings(), SPEC, f"{day(2):%Y-%m-%d}"), rows=2500, knob=CONCEPT)  # labelled day
    serve_and_label(local_stack, "1", day(2, 10), rows=1000, seed=302, knob=CONCEPT)

    drift_report = run_dag(DRIFT_DAG_ID, day(2, 11), conf={"window_hours": 3})
    assert drift_report.outputs["check_drift[network_security]"]["max_psi"] < 0.25  # PSI cannot see it
    assert drift_report.outputs["decide_retraining[network_security]:decision"]["outcome"] == "no_drift"

    report, decision = check(day(3))

    assert report.succeeded, report.task_states
    assert decision["outcome"] == "retrain" and report.task_states["trigger_retraining[network_security]"] == "success"
    (run,) = quality_runs_queued()
    assert run["run_id"] == f"quality__network_security__{day(3):%Y-%m-%dT%H:%M:%S}"
    conf = run["conf"]
    summary = report.outputs["check_quality[network_security]"]
    assert conf["signals"] == ["quality"] and conf["ds"] == f"{day(2):%Y-%m-%d}"
    assert conf["reason"].startswith("quality: v1 degraded on 1,000 labelled rows:") and "roc_auc 0." in conf["reason"]
    assert conf["quality"]["before"] - conf["quality"]["after"] >= 0.05
    assert conf["quality"]["after"] == summary["live_metric"] and conf["quality"]["labelled_rows"] == 1000
    assert conf["feedback"]["feedback_days"] == [f"{day(2):%Y-%m-%d}"]
    (retrain,) = [r for r in rows(local_stack, "retrain_log") if r["run_id"] == run["run_id"]]
    assert json.loads(retrain["conf_json"]) == conf and json.loads(retrain["signals"]) == ["quality"]
    assert rows(local_stack, "quality_check")[-1]["triggered_run_id"] == run["run_id"]
    (alert,) = webhook
    assert alert["event"] == "quality_retraining_triggered" and alert["training_run_id"] == run["run_id"]


def test_ten_checks_while_the_retrain_is_queued_trigger_nothing(local_stack):
    # Two days of feedback: the day that just started has none yet.
    outcomes = [check(day(3, 0, minute), feedback_window_days=2)[1]["outcome"] for minute in range(5, 55, 5)]

    assert outcomes == ["training_active"] * 10
    assert len(quality_runs_queued()) == 1


def test_the_triggered_run_learns_from_the_feedback_and_quality_recovers(local_stack):
    from mlflow import MlflowClient

    from tasks.tracking import alias_version

    (executed,) = run_queued(TRAINING_DAG_ID)
    queued, report = executed
    assert queued["run_id"] == f"quality__network_security__{day(3):%Y-%m-%dT%H:%M:%S}"
    assert report.succeeded, report.task_states
    features = report.outputs["transform"]
    assert features["feedback"]["training_rows"] == 1000  # every labelled served row, once
    assert features["train_rows"] + features["test_rows"] == 2500 + 1000
    client = MlflowClient(local_stack["MLFLOW_TRACKING_URI"])
    assert alias_version(client, MODEL, "champion") == "2"
    run_id = report.outputs["train"]["run_id"]
    lineage = json.loads(open(client.download_artifacts(run_id, "lineage.json")).read())  # noqa: PTH123, SIM115
    assert lineage["feedback"]["feedback_partitions"] == [
        f"s3://{Settings().raw_bucket}/network_data_feedback/ds={day(2):%Y-%m-%d}/"
    ]
    assert lineage["feedback"]["training_rows"] == 1000 and lineage["feedback"]["feedback_rows"] == 1000
    assert client.get_run(run_id).data.tags["trigger_reason"].startswith("quality: v1 degraded")

    # v2 learned the new concept: its live quality on the same kind of traffic is back.
    serve_and_label(local_stack, "2", day(3, 10), rows=800, seed=303, knob=CONCEPT)
    check_report, decision = check(day(4))
    summary = check_report.outputs["check_quality[network_security]"]
    assert summary["champion_version"] == "2" and decision["outcome"] == "no_quality"
    assert summary["live_metric"] > summary["holdout_metric"] - 0.05


def test_drift_and_quality_together_start_one_run_naming_both(local_stack):
    # The old concept is back and the inputs drift: both checks see it.
    serve_and_label(local_stack, "2", day(4, 1), rows=800, seed=304, knob=DriftKnob(feature_drift=1.0))
    drift_report = run_dag(DRIFT_DAG_ID, day(4, 3), conf={"window_hours": 3, "cooldown_minutes": 100_000})
    drift_decision = drift_report.outputs["decide_retraining[network_security]:decision"]
    assert drift_decision["outcome"] == "cooldown" and drift_decision["signals"] == ["drift"]

    report, decision = check(day(5), cooldown_minutes=0)

    assert decision["outcome"] == "retrain"
    runs = queued_runs(TRAINING_DAG_ID)
    assert [r["run_id"] for r in runs] == [f"drift+quality__network_security__{day(5):%Y-%m-%dT%H:%M:%S}"]
    conf = runs[0]["conf"]
    assert conf["signals"] == ["quality", "drift"]
    assert "quality: v2 degraded" in conf["reason"] and "drift: max PSI" in conf["reason"]
    assert conf["max_psi"] >= 0.25 and conf["drifted_features"] and conf["quality"]["after"] < conf["quality"]["before"]
    discard_queued_runs(TRAINING_DAG_ID)


def test_batch_scoring_a_100k_backlog_answers_like_the_serving_app(s3, local_stack):
    """The batch scoring DAG on the stack: the champion's labels and probabilities are the server's."""
    import numpy as np
    from mlflow import MlflowClient

    from tasks import batch_scoring, storage
    from tasks.config import BATCH_SCORING_DAG_ID
    from tasks.datagen import generate
    from tasks.model_io import load_model
    from tasks.tracking import alias_version
    from tests.tasks.serving_app import serve_batches

    ds = f"{day(6):%Y-%m-%d}"
    frame = generate(SPEC, 100_000, seed=306)[SPEC.feature_names]
    backlog = storage.S3Location(Settings().raw_bucket, f"network_data_backlog/ds={ds}/part-0.parquet")
    storage.write_parquet(s3, backlog, frame)

    report = run_dag(BATCH_SCORING_DAG_ID, ds, conf={"chunk_rows": 30_000})

    assert report.succeeded, report.task_states
    manifest = report.outputs["score_backlog"]
    champion = alias_version(MlflowClient(local_stack["MLFLOW_TRACKING_URI"]), MODEL, "champion")
    assert (manifest["model_version"], manifest["rows_scored"], manifest["chunks"]) == (champion, 100_000, 4)
    full = storage.get_json(s3, storage.parse_s3_uri(manifest["manifest_uri"]))
    scores = batch_scoring.read_scores(s3, full)
    assert set(scores["model_version"]) == {champion}
    served = serve_batches(load_model(local_stack["MLFLOW_TRACKING_URI"], MODEL, champion), SPEC, frame, champion)
    assert scores["label"].tolist() == served["label"].tolist()
    np.testing.assert_allclose(scores["probability"], served["probability"], rtol=0, atol=1e-12)
    # The prediction log has them too (source batch), where drift and quality read.
    (log_key, *_) = full["prediction_log_keys"]
    assert log_key.startswith(f"predictions/{MODEL}/dt=")
    logged = storage.read_parquet(s3, storage.S3Location(Settings().lake_bucket, log_key))
    assert set(logged["source"]) == {"batch"} and len(logged) == 30_000
