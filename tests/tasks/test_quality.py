"""Model quality without Airflow: Evidently's metrics against scikit-learn, the metric comparison
table, the skip rules, the degradation signal table, the quality_check row, and one whole
check on a real (sqlite) MLflow registry with the prediction log and feedback in moto."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score, roc_auc_score

from tasks import feedback, quality, storage
from tasks.dataset_spec import PROJECT_ROOT, DatasetSpec
from tasks.feedback import TRUE_LABEL, JoinCounts
from tasks.quality import QualityConfig, compare, performance_signal
from tests.tasks.labelled_traffic import LAKE, RAW, hour_key, log_records, put_feedback, put_jsonl

UTC = dt.UTC
END = dt.datetime(2026, 3, 11, tzinfo=UTC)
HOLDOUT = {"accuracy": 0.95, "precision": 0.94, "recall": 0.93, "f1": 0.935, "roc_auc": 0.98, "pr_auc": 0.97}


def scored(rows: int, seed: int, quality_level: float, spec_positive: int = -1, negative: int = 1) -> pd.DataFrame:
    """Labelled predictions whose probability separates the classes by ``quality_level``."""
    rng = np.random.default_rng(seed)
    truth = np.where(rng.random(rows) < 0.4, spec_positive, negative)
    probability = np.clip(
        np.where(truth == spec_positive, 0.5 + quality_level, 0.5 - quality_level) + rng.normal(0, 0.25, rows), 0, 1
    )
    label = np.where(probability >= 0.5, spec_positive, negative)
    return pd.DataFrame({"label": label, "probability": probability, TRUE_LABEL: truth})


def joined(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    parts = [f.assign(model_version=v, request_id=[f"{v}-{i}" for i in range(len(f))]) for v, f in frames.items()]
    return pd.concat(parts, ignore_index=True)


def window() -> quality.QualityWindow:
    return quality.quality_window(END, QualityConfig())


# --- configuration and window ----------------------------------------------------------------


def test_shipped_config_has_the_issue_defaults() -> None:
    config = quality.load_quality_config()
    assert config.primary_metric == "roc_auc"
    assert config.max_drop == {"roc_auc": 0.05, "accuracy": 0.05}
    assert config == QualityConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("primary_metric: speed\n", "primary_metric"),
        ("max_drop: {latency: 0.1}\n", "unknown metric"),
        ("max_drop: {roc_auc: 0}\n", "within"),
        ("consecutive_checks: 0\n", "at least 1"),
        ("lookback_days: 1\nfeedback_window_days: 3\n", "cover"),
        ("cooldown: 5\n", "unknown key"),
    ],
)
def test_bad_config_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "quality.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        quality.load_quality_config(path)
    assert str(path) in str(caught.value)


def test_window_reads_the_days_before_its_end_and_looks_back_for_late_labels() -> None:
    midnight = quality.quality_window(END, QualityConfig(feedback_window_days=2, lookback_days=5))
    assert midnight.feedback_days == ("2026-03-09", "2026-03-10")
    assert midnight.window_start == dt.datetime(2026, 3, 9, tzinfo=UTC)
    assert midnight.predictions_from == dt.datetime(2026, 3, 6, tzinfo=UTC)
    manual = quality.quality_window(END + dt.timedelta(hours=13, minutes=20), QualityConfig())
    assert manual.feedback_days == ("2026-03-11",)


# --- metrics with Evidently ------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["network_security", "intrusion_flows"])
def test_evidently_metrics_match_scikit_learn_with_the_spec_positive_class(dataset: str, request: Any) -> None:
    spec: DatasetSpec = request.getfixturevalue("network_spec" if dataset == "network_security" else "flows_spec")
    frame = scored(1500, seed=1, quality_level=0.15, spec_positive=spec.positive_class, negative=spec.negative_class)
    # A served label is the model's, not always the probability threshold's.
    frame.loc[:9, "label"] = spec.negative_class
    _, metrics = quality.classification_quality(frame, spec)
    truth, label = frame[TRUE_LABEL], frame["label"]
    positive = spec.positive_class
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, label))
    assert metrics["precision"] == pytest.approx(precision_score(truth, label, pos_label=positive))
    assert metrics["recall"] == pytest.approx(recall_score(truth, label, pos_label=positive))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(truth == positive, frame["probability"]))
    expected = confusion_matrix(truth, label, labels=[positive, spec.negative_class]).tolist()
    assert metrics["confusion_matrix"] == {"labels": [positive, spec.negative_class], "matrix": expected}
    assert metrics["rows"] == 1500


def test_single_class_truth_is_refused(network_spec: DatasetSpec) -> None:
    frame = scored(300, seed=1, quality_level=0.2).assign(**{TRUE_LABEL: -1})
    with pytest.raises(ValueError, match="single class"):
        quality.classification_quality(frame, network_spec)


# --- the metric comparison table -------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "degraded"),
    [
        ({"roc_auc": 0.97, "accuracy": 0.94}, set()),  # small drops
        ({"roc_auc": 0.93, "accuracy": 0.94}, {"roc_auc"}),  # exactly 0.05 down counts
        ({"roc_auc": 0.9301, "accuracy": 0.90}, {"accuracy"}),  # 5 points of accuracy
        ({"roc_auc": 0.80, "accuracy": 0.70}, {"roc_auc", "accuracy"}),
        ({"roc_auc": 0.99, "accuracy": 0.99}, set()),  # better than the holdout
        ({"roc_auc": 0.97, "accuracy": 0.94, "precision": 0.10}, set()),  # precision has no limit
    ],
)
def test_comparison_table(live: dict[str, float], degraded: set[str]) -> None:
    table = compare(live, HOLDOUT, {"roc_auc": 0.05, "accuracy": 0.05})
    assert [row["metric"] for row in table] == list(quality.COMPARED_METRICS)
    assert {row["metric"] for row in table if row["degraded"]} == degraded
    rows = {row["metric"]: row for row in table}
    assert rows["roc_auc"]["change"] == pytest.approx(live["roc_auc"] - HOLDOUT["roc_auc"], abs=1e-6)
    assert rows["roc_auc"]["max_drop"] == 0.05 and rows["precision"]["max_drop"] is None
    if "precision" not in live:
        assert rows["precision"]["live"] is None and rows["precision"]["change"] is None


def test_comparison_without_holdout_or_with_nan_flags_nothing() -> None:
    assert not any(row["degraded"] for row in compare({"roc_auc": 0.5, "accuracy": 0.5}, None, {"roc_auc": 0.05}))
    nan = compare({"roc_auc": float("nan")}, HOLDOUT, {"roc_auc": 0.05})
    assert nan[-1] == {
        "metric": "roc_auc",
        "holdout": 0.98,
        "live": None,
        "change": None,
        "max_drop": 0.05,
        "degraded": False,
    }


def test_rendered_comparison_is_a_markdown_table() -> None:
    text = quality.render_comparison(compare({"roc_auc": 0.9, "accuracy": 0.94}, HOLDOUT, {"roc_auc": 0.05}))
    assert text.splitlines()[0] == "| metric | holdout | live | change | max drop | degraded |"
    assert "| roc_auc | 0.9800 | 0.9000 | -0.0800 | 0.0500 | yes |" in text


# --- evaluating a window -----------------------------------------------------------------------


def test_each_version_and_shadow_is_judged_against_its_own_holdout(network_spec: DatasetSpec) -> None:
    frames = {"3": scored(800, seed=1, quality_level=0.05), "4": scored(600, seed=2, quality_level=0.45)}
    labelled = joined(frames)
    # v5 shadows v4's traffic: its answers ride on the same records.
    shadow = labelled["model_version"] == "4"
    labelled.loc[shadow, "shadow_model_version"] = "5"
    labelled.loc[shadow, "shadow_label"] = labelled.loc[shadow, "label"]
    labelled.loc[shadow, "shadow_probability"] = labelled.loc[shadow, "probability"]
    check = quality.evaluate_window(
        labelled,
        JoinCounts(labelled_rows=1400),
        spec=network_spec,
        model_name="network_security",
        champion_version="3",
        holdout={"3": HOLDOUT, "4": HOLDOUT, "5": None},
        window=window(),
        config=QualityConfig(),
    )
    summary = check.summary
    assert summary["outcome"] == "checked" and summary["degraded"] is True
    assert summary["labelled_rows"] == 800
    versions = {(v["model_version"], v["scored_as"]): v for v in summary["versions"]}
    assert set(versions) == {("3", "served"), ("4", "served"), ("5", "shadow")}
    assert versions[("3", "served")]["degraded"] and not versions[("4", "served")]["degraded"]
    assert versions[("5", "shadow")]["metrics"]["roc_auc"] == versions[("4", "served")]["metrics"]["roc_auc"]
    assert not any(row["degraded"] for row in versions[("5", "shadow")]["comparison"])  # no holdout known
    assert set(check.snapshots) == {"report.html", "report-v4.html", "report-v5-shadow.html"}
    assert summary["holdout_metric"] == HOLDOUT["roc_auc"]
    assert summary["live_metric"] == pytest.approx(versions[("3", "served")]["metrics"]["roc_auc"], abs=1e-6)
    assert summary["reason"].startswith("v3 degraded on 800 labelled rows: ")
    json.dumps(summary)  # the summary is JSON as it is


@pytest.mark.parametrize(
    ("rows", "holdout", "expected"),
    [
        (150, HOLDOUT, "champion v3: 150 labelled rows (minimum 200) in the feedback of 2026-03-10"),
        (0, HOLDOUT, "champion v3: no labelled rows in the feedback of 2026-03-10"),
        (500, None, "champion v3 has no holdout metrics"),
    ],
)
def test_too_little_truth_or_no_holdout_skips_with_the_reason(
    network_spec: DatasetSpec, rows: int, holdout: dict | None, expected: str
) -> None:
    labelled = joined({"3": scored(rows, seed=1, quality_level=0.2)}) if rows else joined({"4": scored(10, 1, 0.2)})
    check = quality.evaluate_window(
        labelled,
        JoinCounts(),
        spec=network_spec,
        model_name="network_security",
        champion_version="3",
        holdout={"3": holdout},
        window=window(),
        config=QualityConfig(),
    )
    assert check.skipped and check.summary["reason"].startswith(expected)
    assert check.summary["degraded"] is False
    signal = performance_signal(check.summary, [], 1)
    assert not signal.detected and signal.reason.startswith("quality skipped: ")


# --- the degradation signal --------------------------------------------------------------------


def summary_of(degraded: bool, version: str = "3") -> dict[str, Any]:
    return {
        "outcome": "checked",
        "degraded": degraded,
        "champion_version": version,
        "primary_metric": "roc_auc",
        "holdout_metric": 0.98,
        "live_metric": 0.90 if degraded else 0.97,
        "labelled_rows": 640,
        "reason": "v3 degraded on 640 labelled rows: roc_auc 0.980 -> 0.900" if degraded else "v3 within",
    }


def past(*checks: str) -> list[dict[str, Any]]:
    """History newest first: D = degraded, O = ok, S = skipped, N = degraded but another champion."""
    kinds = {
        "D": {"champion_version": "3", "degraded": 1, "decision": "degradation_pending"},
        "O": {"champion_version": "3", "degraded": 0, "decision": "no_degradation"},
        "S": {"champion_version": "3", "degraded": 0, "decision": "skipped"},
        "N": {"champion_version": "2", "degraded": 1, "decision": "retrain"},
    }
    return [kinds[c] for c in checks]


@pytest.mark.parametrize(
    ("degraded", "history", "k", "detected", "streak"),
    [
        (False, past("D", "D"), 1, False, 0),
        (True, past(), 1, True, 1),
        (True, past(), 2, False, 1),
        (True, past("D"), 2, True, 2),
        (True, past("O", "D"), 2, False, 1),
        (True, past("S", "D"), 2, True, 2),  # a skipped check neither counts nor breaks the streak
        (True, past("S", "S"), 2, False, 1),
        (True, past("N"), 2, False, 1),  # degraded checks of the previous champion do not count
        (True, past("D", "D", "D"), 3, True, 3),
        (True, past("D", "D", "D", "D"), 2, True, 2),
    ],
)
def test_degradation_signal_table(
    degraded: bool, history: list[dict[str, Any]], k: int, detected: bool, streak: int
) -> None:
    signal = performance_signal(summary_of(degraded), history, k)
    assert (signal.detected, signal.degraded, signal.streak) == (detected, degraded, streak)
    assert (signal.metric, signal.before, signal.labelled_rows) == ("roc_auc", 0.98, 640)
    assert signal.after == (0.90 if degraded else 0.97)
    assert signal.reason.startswith("quality: v3")
    if degraded and not detected:
        assert f"degraded in {streak} of the {k} consecutive checks" in signal.reason


# --- the monitoring store ----------------------------------------------------------------------


@pytest.fixture
def store() -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:")
    connection.executescript((PROJECT_ROOT / "include" / "sql" / "monitoring_store.sql").read_text())
    return connection


def test_quality_check_row_fits_the_table_and_reads_back(store: sqlite3.Connection, network_spec: DatasetSpec) -> None:
    columns = [row[1] for row in store.execute("PRAGMA table_info(quality_check)")]
    assert tuple(columns) == quality.QUALITY_CHECK_FIELDS
    labelled = joined({"3": scored(400, seed=1, quality_level=0.05)})
    checked = quality.evaluate_window(
        labelled,
        JoinCounts(feedback_rows=450, duplicate_labels=20, unknown_request_ids=30, labelled_rows=400),
        spec=network_spec,
        model_name="network_security",
        champion_version="3",
        holdout={"3": HOLDOUT},
        window=window(),
        config=QualityConfig(),
    ).summary
    skipped = quality.evaluate_window(
        labelled.head(10),
        JoinCounts(),
        spec=network_spec,
        model_name="network_security",
        champion_version="3",
        holdout={"3": HOLDOUT},
        window=quality.quality_window(END + dt.timedelta(days=1), QualityConfig()),
        config=QualityConfig(),
    ).summary
    at = dt.datetime(2026, 3, 11, 0, 5, tzinfo=UTC)
    for run_id, summary, decision in (("q1", checked, "retrain"), ("q2", skipped, "skipped")):
        row = quality.quality_check_row(
            run_id,
            summary,
            decision=decision,
            reason=summary["reason"],
            triggered_run_id="t1" if run_id == "q1" else None,
            checked_at=at,
        )
        store.execute(
            f"INSERT OR REPLACE INTO quality_check ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    records = store.execute((PROJECT_ROOT / "include" / "sql" / "latest_quality_checks.sql").read_text()).fetchall()
    history = quality.history_from_records(records, "network_security", "network_security", before="2026-03-13")
    assert [h["decision"] for h in history] == ["skipped", "retrain"]
    first = history[1]
    assert first["degraded"] == 1 and first["triggered_run_id"] == "t1" and first["labelled_rows"] == 400
    assert first["holdout_metric"] == HOLDOUT["roc_auc"] and first["live_metric"] == checked["live_metric"]
    stored = dict(
        zip(
            quality.QUALITY_CHECK_FIELDS,
            store.execute("SELECT * FROM quality_check WHERE dag_run_id='q1'").fetchone(),
            strict=True,
        )
    )
    assert (stored["feedback_rows"], stored["duplicate_labels"], stored["unknown_request_ids"]) == (450, 20, 30)
    assert json.loads(stored["metrics_json"])["versions"][0]["rows"] == 400
    assert history[0]["holdout_metric"] is None and history[0]["degraded"] == 0
    assert quality.history_from_records(records, "intrusion_flows", "network_security", before="2026-03-13") == []


# --- a whole check -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A sqlite MLflow registry with v1 (no test metrics) and v2 (the champion, holdout logged)."""
    import mlflow
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("training", artifact_location=(tmp_path / "artifacts").as_uri())
    # Artifacts of the monitoring runs under the temporary folder too, not ./mlruns.
    client.create_experiment("monitoring", artifact_location=(tmp_path / "monitoring").as_uri())
    client.create_registered_model("network_security")
    for version, metrics in (
        ("1", {}),
        ("2", {f"test_{k}": v for k, v in HOLDOUT.items()} | {"champion_test_roc_auc": 0.5}),
    ):
        run = client.create_run(experiment)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        created = client.create_model_version("network_security", f"runs:/{run.info.run_id}/model", run.info.run_id)
        assert str(created.version) == version
    client.set_registered_model_alias("network_security", "champion", "2")
    yield uri
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def test_holdout_metrics_are_the_test_metrics_of_the_training_run(registry: str) -> None:
    assert quality.holdout_metrics(registry, "network_security", "2") == HOLDOUT
    assert quality.holdout_metrics(registry, "network_security", "1") is None


def test_a_whole_check_finds_the_drop_and_writes_its_outputs(
    registry: str, buckets: Any, network_spec: DatasetSpec
) -> None:
    served_at = END - dt.timedelta(days=2)
    frame = scored(600, seed=4, quality_level=0.02)
    records = [
        {**r, "label": int(label), "probability": float(p), "model_version": "2"}
        for r, label, p in zip(
            log_records(network_spec, [f"q{i}" for i in range(600)], at=served_at),
            frame["label"],
            frame["probability"],
            strict=True,
        )
    ]
    put_jsonl(buckets, hour_key(served_at, "a.jsonl"), records)
    day = "2026-03-10"
    put_feedback(
        buckets, day, "f.csv", [(f"q{i}", int(t), f"{day}T12:00:00Z") for i, t in enumerate(frame[TRUE_LABEL])]
    )
    check = quality.run_quality_check(
        buckets,
        tracking_uri=registry,
        raw_bucket=RAW,
        lake_bucket=LAKE,
        spec=network_spec,
        model_name="network_security",
        window_end=END,
        config=QualityConfig(),
    )
    summary = check.summary
    assert summary["outcome"] == "checked" and summary["degraded"] is True
    assert summary["champion_version"] == "2" and summary["labelled_rows"] == 600
    assert summary["live_metric"] == pytest.approx(
        roc_auc_score(frame[TRUE_LABEL] == -1, frame["probability"]), abs=1e-6
    )
    uris = quality.write_outputs(
        buckets, LAKE, quality.report_prefix("network_security", "manual__2026-03-11T00:00:00+00:00"), check
    )
    assert uris["report_uri"] == f"s3://{LAKE}/quality/network_security/manual__2026-03-11T00_00_00_00_00/report.html"
    html = storage.get_bytes(buckets, storage.parse_s3_uri(uris["report_uri"]))
    assert b"<html" in html[:2000].lower()
    stored = storage.get_json(buckets, storage.parse_s3_uri(uris["summary_uri"]))
    assert stored["report_uri"] == uris["report_uri"] and stored["comparison"] == summary["comparison"]
    # The signal and the conf of the training run it would start; the conf's feedback part is
    # what the triggered run's transform step passes on to build its feedback rows.
    signal = performance_signal(summary, [], consecutive_checks=1)
    assert signal.detected and signal.before == HOLDOUT["roc_auc"] and signal.labelled_rows == 600
    conf = json.loads(json.dumps(quality.retrain_conf(summary, signal)))
    assert conf["reason"].startswith("quality: v2 degraded on 600 labelled rows: ")
    assert conf["quality"]["report_uri"] == uris["report_uri"]
    frame, lineage = feedback.feedback_training_frame(
        buckets, raw_bucket=RAW, lake_bucket=LAKE, spec=network_spec, **conf["feedback"]
    )
    assert len(frame) == 600 and lineage["training_rows"] == 600
    assert lineage["feedback_partitions"] == [f"s3://{RAW}/network_data_feedback/ds={day}/"]
    experiment_id, run_id = quality.log_monitoring_run(registry, "monitoring", check, {"airflow_dag_run_id": "manual"})
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=registry).get_run(run_id)
    assert run.data.tags["outcome"] == "checked" and run.data.metrics["degraded"] == 1.0
    assert run.data.metrics["holdout_roc_auc"] == HOLDOUT["roc_auc"] and run.data.metrics["labelled_rows"] == 600


def test_no_champion_is_a_clear_error(registry: str, buckets: Any, network_spec: DatasetSpec) -> None:
    with pytest.raises(quality.QualityError, match="has no champion"):
        quality.run_quality_check(
            buckets,
            tracking_uri=registry,
            raw_bucket="r",
            lake_bucket="l",
            spec=network_spec,
            model_name="never_registered",
            window_end=END,
            config=QualityConfig(),
        )
