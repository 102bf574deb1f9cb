"""The retrain rule, table by table: threshold, consecutive checks, active runs, cooldown, several signals."""

from __future__ import annotations

import datetime as dt

import pytest

from tasks.retrain import Signal, StormGuard, decide, run_id, skip_reason

END = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
SIX_HOURS = dt.timedelta(hours=6)


def drift(fired: bool, history=(), k: int = 1) -> Signal:
    evidence = {"drift_report_uri": "s3://lake/drift/r.html", "max_psi": 0.4, "drifted_features": ["f1"]}
    return Signal("drift", fired, tuple(history), k, "drift: max PSI 0.400 >= 0.25", evidence)


def quality(fired: bool, history=(), k: int = 1) -> Signal:
    return Signal("quality", fired, tuple(history), k, "quality: roc_auc 0.81 < 0.90", {"quality_roc_auc": 0.81})


def rule(signals, active=0, last=None, labelled="2026-11-22"):
    return decide(
        signals,
        dataset="network_security",
        window_end=END,
        guard=StormGuard(active, last, SIX_HOURS),
        labelled_day=labelled,
        window_days=2,
    )


@pytest.mark.parametrize(
    ("detected", "previous", "k", "active", "last_trigger", "outcome"),
    [
        (False, [], 1, 0, None, "no_drift"),
        (False, [True, True], 2, 0, None, "no_drift"),
        (True, [], 1, 0, None, "retrain"),
        (True, [], 2, 0, None, "drift_pending"),
        (True, [False, True], 2, 0, None, "drift_pending"),
        (True, [True], 2, 0, None, "retrain"),
        (True, [True, True, False], 3, 0, None, "retrain"),
        (True, [True, False, True], 3, 0, None, "drift_pending"),
        (True, [], 1, 1, None, "training_active"),
        (True, [True], 2, 2, None, "training_active"),
        (True, [], 1, 0, END - 2 * HOUR, "cooldown"),
        (True, [], 1, 0, END - 6 * HOUR, "retrain"),  # the cooldown is over exactly at its end
        (True, [], 1, 0, END - 7 * HOUR, "retrain"),
        (True, [], 2, 1, END - HOUR, "drift_pending"),  # the rule first, then storm protection
        (True, [], 1, 1, END - HOUR, "training_active"),  # an active run before the cooldown
        (False, [], 1, 1, END - HOUR, "no_drift"),
    ],
)
def test_one_signal(detected, previous, k, active, last_trigger, outcome):
    decision = rule([drift(detected, previous, k)], active=active, last=last_trigger)
    assert decision.outcome == outcome
    assert decision.trigger is (outcome == "retrain")
    assert decision.reason
    assert (decision.run_id is not None) is decision.trigger


def test_no_labelled_data_means_no_run():
    decision = rule([drift(True)], labelled=None)
    assert (decision.trigger, decision.outcome) == (False, "no_labelled_data")
    assert "no labelled drop" in decision.reason


def test_a_triggered_run_names_its_day_reason_and_evidence():
    decision = rule([drift(True)])
    assert decision.run_id == "drift__network_security__2026-11-23T12:00:00"
    assert decision.conf == {
        "ds": "2026-11-22",
        "dataset": "network_security",
        "window_days": 2,
        "reason": "drift: max PSI 0.400 >= 0.25",
        "signals": ["drift"],
        "drift_report_uri": "s3://lake/drift/r.html",
        "max_psi": 0.4,
        "drifted_features": ["f1"],
    }
    plain = decision.as_dict()
    assert plain["retrain"] == {"run_id": decision.run_id, "conf": decision.conf}
    assert rule([drift(False)]).as_dict()["retrain"] is None


@pytest.mark.parametrize(
    ("signals", "outcome", "fired"),
    [
        ([drift(False), quality(False)], "no_signal", ()),
        ([drift(True, k=2), quality(False)], "signal_pending", ("drift",)),
        ([drift(True), quality(False)], "retrain", ("drift",)),
        ([drift(False), quality(True)], "retrain", ("quality",)),
        ([drift(True), quality(True)], "retrain", ("drift", "quality")),
        ([drift(True, k=2), quality(True)], "retrain", ("quality",)),  # only ready signals trigger
    ],
)
def test_several_signals_share_one_rule(signals, outcome, fired):
    decision = rule(signals)
    assert (decision.outcome, decision.signals) == (outcome, fired)


def test_signals_firing_together_make_exactly_one_run_naming_every_reason():
    decision = rule([drift(True), quality(True)])
    assert decision.run_id == "drift+quality__network_security__2026-11-23T12:00:00"
    assert decision.conf["signals"] == ["drift", "quality"]
    assert decision.conf["reason"] == "drift: max PSI 0.400 >= 0.25; quality: roc_auc 0.81 < 0.90"
    assert decision.conf["max_psi"] == 0.4 and decision.conf["quality_roc_auc"] == 0.81


@pytest.mark.parametrize("signals", [[drift(True)], [quality(True)], [drift(True), quality(True)]])
def test_one_cooldown_and_one_run_at_a_time_for_every_reason(signals):
    assert rule(signals, last=END - HOUR).outcome == "cooldown"
    assert rule(signals, active=1).outcome == "training_active"


def test_run_ids_are_idempotent_per_check():
    other_zone = END.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert run_id(["drift"], "ds1", END) == run_id(["drift"], "ds1", other_zone)
    assert run_id(["quality", "drift"], "ds1", END) == run_id(["drift", "quality"], "ds1", END)
    assert run_id(["drift"], "ds1", END + HOUR) != run_id(["drift"], "ds1", END)


@pytest.mark.parametrize(("kind", "k"), [("drift detection", 1), ("drift", 0)])
def test_a_malformed_signal_is_refused(kind, k):
    with pytest.raises(ValueError):
        Signal(kind, True, consecutive=k)


def test_no_signal_is_a_programming_error():
    with pytest.raises(ValueError, match="at least one signal"):
        rule([])


@pytest.mark.parametrize("trigger", [True, False])
def test_exactly_one_branch_of_a_mapped_decision_runs_and_the_other_says_why_it_skips(trigger):
    decision = {"dataset": "flows", "trigger": trigger, "outcome": "no_drift", "reason": "PSI 0.05",
                "retrain": {"run_id": "drift__flows__1"} if trigger else None}  # fmt: skip
    runs = [skip_reason(decision, triggers=branch) is None for branch in (True, False)]
    assert runs == [trigger, not trigger]
    skipped = skip_reason(decision, triggers=not trigger)
    assert skipped == (
        "flows: training run drift__flows__1 triggered" if trigger else "flows: no retraining (no_drift: PSI 0.05)"
    )
