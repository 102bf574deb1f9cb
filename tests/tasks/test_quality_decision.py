"""The quality DAG's decision on a real (SQLite) monitoring store: the retrain rule shared with drift."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tasks import drift, quality, storage
from tasks.config import Settings

UTC = dt.UTC
AT = dt.datetime(2026, 11, 23, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)


def _plan(window_end: dt.datetime, **params) -> quality.QualityPlan:
    settings = Settings(raw_bucket="raw", lake_bucket="lake")
    return quality.plan_quality_check(settings, params, window_end, "scheduled", ["network_security"])


def _summary(window_end: dt.datetime, degraded: bool, version: str = "1") -> dict:
    live = 0.70 if degraded else 0.95
    return {
        "dataset": "network_security", "model_name": "network_security", "champion_version": version,
        "outcome": "checked", "degraded": degraded, "primary_metric": "roc_auc", "labelled_rows": 900,
        "holdout_metric": 0.96, "live_metric": live, "report_uri": "s3://lake/quality/r.html",
        "reason": f"v{version} {'degraded' if degraded else 'within the tolerated drops'} on 900 labelled rows: "
        f"roc_auc 0.960 -> {live:.3f}",
        "feedback": {"feedback_rows": 950, "duplicate_labels": 10, "unknown_request_ids": 40},
        "metrics": {"accuracy": live, "roc_auc": live},
        "window": {"start": (window_end - 24 * HOUR).isoformat(), "end": window_end.isoformat(),
                   "feedback_days": [(window_end - HOUR).date().isoformat()],
                   "predictions_from": (window_end - 7 * 24 * HOUR).isoformat()},
    }  # fmt: skip


@pytest.fixture
def labelled_day(mock_s3):
    mock_s3.create_bucket(Bucket="raw")
    storage.put_bytes(mock_s3, storage.S3Location("raw", "network_data/ds=2026-11-22/part-0000.csv"), b"x")
    return mock_s3


def _decide(s3, store, when, degraded, run, active=0, **params):
    plan = _plan(when, **params)
    return quality.decide_retraining(s3, store, plan, _summary(when, degraded), run, active)


def test_calm_quality_triggers_nothing_and_is_recorded(labelled_day, store):
    decision = _decide(labelled_day, store, AT, False, "q-1")

    assert (decision.trigger, decision.outcome) == (False, "no_quality")
    (row,) = store.table("quality_check")
    assert row["decision"] == "no_quality" and row["degraded"] == 0 and row["live_metric"] == 0.95
    assert store.table("retrain_log") == []


def test_a_degraded_champion_triggers_one_run_naming_quality_and_the_drop(labelled_day, store):
    decision = _decide(labelled_day, store, AT, True, "q-1")

    assert decision.outcome == "retrain" and decision.run_id == "quality__network_security__2026-11-23T00:00:00"
    conf = decision.conf
    assert conf["signals"] == ["quality"] and conf["ds"] == "2026-11-22"
    assert conf["reason"].startswith("quality: v1 degraded") and "0.960 -> 0.700" in conf["reason"]
    assert conf["quality"]["before"] == 0.96 and conf["quality"]["after"] == 0.70
    assert conf["quality"]["labelled_rows"] == 900
    assert conf["feedback"]["feedback_days"] == ["2026-11-22"] and conf["feedback"]["model_name"] == "network_security"
    (retrain,) = store.table("retrain_log")
    assert json.loads(retrain["conf_json"]) == conf
    assert store.table("quality_check")[0]["triggered_run_id"] == decision.run_id


def test_storm_protection_is_shared_with_drift(labelled_day, store):
    """A drift-triggered retrain starts the one cooldown; an active run holds quality back."""
    drift_plan = drift_check_plan(AT - 2 * HOUR)
    drift.decide_retraining(labelled_day, store, drift_plan, drift_summary(True), "d-1", 0)

    active = _decide(labelled_day, store, AT, True, "q-1", active=1)
    cooling = _decide(labelled_day, store, AT + HOUR, True, "q-2")
    lifted = _decide(labelled_day, store, AT + 2 * HOUR, True, "q-3", cooldown_minutes=0)

    assert [d.outcome for d in (active, cooling, lifted)] == ["training_active", "cooldown", "retrain"]
    assert len(store.table("retrain_log")) == 2


def test_k_degraded_checks_in_a_row_of_the_same_champion(labelled_day, store):
    outcomes = [
        _decide(labelled_day, store, AT + n * HOUR, True, f"q-{n}", consecutive_checks=2).outcome for n in range(2)
    ]
    assert outcomes == ["quality_pending", "retrain"]


def test_drift_held_by_storm_protection_joins_the_quality_run(labelled_day, store):
    """Drift and quality together: one run, its conf naming both reasons and both evidences."""
    held = drift.decide_retraining(labelled_day, store, drift_check_plan(AT - HOUR), drift_summary(True), "d-1", 1)
    assert held.outcome == "training_active"

    decision = _decide(labelled_day, store, AT, True, "q-1")

    assert decision.run_id == "drift+quality__network_security__2026-11-23T00:00:00"
    assert decision.conf["signals"] == ["quality", "drift"]
    assert "quality: v1 degraded" in decision.conf["reason"] and "drift: max PSI 0.600" in decision.conf["reason"]
    assert decision.conf["max_psi"] == 0.6 and decision.conf["drifted_features"] == ["f1"]
    assert decision.conf["quality"]["after"] == 0.70


def test_a_drift_signal_already_acted_on_or_calm_stays_out(labelled_day, store):
    drift.decide_retraining(labelled_day, store, drift_check_plan(AT - 9 * HOUR), drift_summary(True), "d-1", 0)
    drift.decide_retraining(labelled_day, store, drift_check_plan(AT - HOUR), drift_summary(False), "d-2", 0)

    decision = _decide(labelled_day, store, AT, True, "q-1", cooldown_minutes=0)

    assert decision.conf["signals"] == ["quality"]


def drift_check_plan(window_end: dt.datetime):
    from tasks.plan import plan_check

    settings = Settings(raw_bucket="raw", lake_bucket="lake")
    return plan_check(settings, {"window_hours": 1}, window_end, "scheduled", ["network_security"], drift.DriftConfig())


def drift_summary(detected: bool) -> dict:
    return {
        "drift_detected": detected, "max_psi": 0.6 if detected else 0.01, "prediction_psi": 0.01,
        "psi_threshold": 0.25, "drifted_features": ["f1"] if detected else [], "report_uri": "s3://lake/r.html",
        "rows": {"current": 900, "evaluated": 900, "reference": 1000}, "champion": {"model_version": "1"},
    }  # fmt: skip


def test_the_plan_takes_the_shared_cooldown_and_rejects_bad_overrides():
    from tasks.plan import PlanError

    plan = _plan(AT)
    assert plan.cooldown_minutes == drift.load_drift_config().cooldown_minutes
    assert quality.QualityPlan.from_xcom(plan.to_xcom()) == plan
    with pytest.raises(PlanError, match="min_labelled_rows must be at least 1"):
        _plan(AT, min_labelled_rows=0)
    with pytest.raises(PlanError, match="unknown dataset"):
        _plan(AT, dataset="nope")


def test_quality_held_by_storm_protection_joins_the_drift_run(labelled_day, store):
    """The other order: the quality drop is held, the next drift check names both and brings the feedback."""
    held = _decide(labelled_day, store, AT, True, "q-1", active=1)
    assert held.outcome == "training_active"

    decision = drift.decide_retraining(labelled_day, store, drift_check_plan(AT + HOUR), drift_summary(True), "d-1", 0)

    assert decision.run_id == "drift+quality__network_security__2026-11-23T01:00:00"
    assert decision.conf["signals"] == ["drift", "quality"]
    assert "quality: v1 degraded" in decision.conf["reason"] and decision.conf["drift_report_uri"]
    assert decision.conf["feedback"]["feedback_days"] == ["2026-11-22"]  # the run learns from the labels


def test_a_drift_check_alone_names_only_drift(labelled_day, store):
    _decide(labelled_day, store, AT, False, "q-1")
    decision = drift.decide_retraining(labelled_day, store, drift_check_plan(AT + HOUR), drift_summary(True), "d-1", 0)
    assert decision.conf["signals"] == ["drift"] and "feedback" not in decision.conf


def test_each_datasets_quality_check_judges_its_own_model():
    import datetime as dt

    from tasks.config import Settings
    from tasks.quality import plan_quality_checks

    settings = Settings(model_name="ns_renamed")  # the setting names network_security's model only
    plans = plan_quality_checks(
        settings, {}, dt.datetime(2026, 1, 2, tzinfo=dt.UTC), "scheduled",
        ["intrusion_flows", "network_security"], lambda model: True,
    )  # fmt: skip
    assert {(p.dataset, p.model_name) for p in plans} == {
        ("intrusion_flows", "intrusion_flows"),
        ("network_security", "ns_renamed"),
    }
