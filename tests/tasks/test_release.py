"""The release's settings and each stage's verdict from live metrics (no Airflow, no server)."""

from __future__ import annotations

import datetime as dt

import pytest

from tasks import release
from tasks.release import (
    ABORT,
    PASS,
    PROCEED_INSUFFICIENT,
    WAIT,
    CanaryConfig,
    ShadowConfig,
    alarm_verdict,
    approval_decision,
    canary_verdict,
    combine,
    parse_release_config,
    score_psi,
    shadow_verdict,
)

START = dt.datetime(2026, 9, 1, 12, 0, tzinfo=dt.UTC)
SAME = [10, 20, 30, 40, 50, 50, 40, 30, 20, 10]
SHIFTED = [0, 0, 0, 0, 0, 0, 0, 50, 100, 150]


def at(seconds: float) -> dt.datetime:
    return START + dt.timedelta(seconds=seconds)


def shadow_report(rows=200, agreement=0.99, p99=5.0, failed=0, candidate_hist=SAME, state="running"):
    return {
        "state": state,
        "mode": "shadow",
        "weight": 0.0,
        "started_at": START.isoformat(),
        "roles": {
            "baseline": {"requests": rows, "score_histogram": SAME},
            "candidate": {"requests": rows, "score_histogram": candidate_hist},
        },
        "shadow": {"rows": rows, "agreement_rate": agreement, "candidate_p99_ms": p99, "failed_rows": failed},
    }


def canary_report(weight=0.1, requests=100, errors=0, p99=5.0, hist=SAME, baseline_requests=900, state="running"):
    return {
        "state": state,
        "mode": "canary",
        "weight": weight,
        "started_at": START.isoformat(),
        "roles": {
            "baseline": {"requests": baseline_requests, "error_rate": 0.0, "p99_ms": 4.0, "score_histogram": SAME},
            "candidate": {
                "requests": requests,
                "errors_5xx": errors,
                "error_rate": errors / requests if requests else 0.0,
                "p99_ms": p99,
                "score_histogram": hist,
            },
        },
    }


SHADOW = ShadowConfig(min_requests=100, max_minutes=1)


@pytest.mark.parametrize(
    ("report", "seconds", "config", "status", "reason"),
    [
        (shadow_report(), 10, SHADOW, PASS, "agreement 0.99"),
        (shadow_report(rows=50), 10, SHADOW, WAIT, "50 of 100"),
        (shadow_report(rows=50), 61, SHADOW, PROCEED_INSUFFICIENT, "only 50 of 100"),
        (shadow_report(rows=50), 61, ShadowConfig(min_requests=100, max_minutes=1, on_insufficient_traffic="abort"),
         ABORT, "on_insufficient_traffic: abort"),
        (shadow_report(agreement=0.5), 10, SHADOW, ABORT, "agreement 0.5 below"),
        (shadow_report(candidate_hist=SHIFTED), 10, SHADOW, ABORT, "score PSI"),
        (shadow_report(p99=900.0), 10, SHADOW, ABORT, "p99 900.0 ms above"),
        (shadow_report(failed=3), 10, SHADOW, ABORT, "failed on 3"),
        (shadow_report(state="aborted"), 10, SHADOW, ABORT, "runs no shadow"),
    ],
)  # fmt: skip
def test_shadow_verdicts(report, seconds, config, status, reason):
    result = shadow_verdict(report, config, at(seconds))
    assert result["status"] == status
    assert any(reason in r for r in result["reasons"]), result["reasons"]


CANARY = CanaryConfig(bake_seconds=30, min_requests=20)


@pytest.mark.parametrize(
    ("report", "weight", "seconds", "config", "status", "reason"),
    [
        (canary_report(), 0.1, 31, CANARY, PASS, "100 requests"),
        (canary_report(), 0.1, 5, CANARY, WAIT, "baking 5 of 30"),
        # 1 error in 100 = 1 % > 0.1 %: aborted at once, the bake is not waited out
        (canary_report(errors=1), 0.1, 5, CANARY, ABORT, "5xx rate 0.0100 above 0.001"),
        (canary_report(requests=10, errors=1), 0.1, 5, CANARY, WAIT, "baking"),  # too few to judge yet
        (canary_report(weight=0.5, p99=900.0), 0.5, 5, CANARY, ABORT, "p99 900.0 ms above"),
        (canary_report(weight=0.5, hist=SHIFTED), 0.5, 5, CANARY, ABORT, "score PSI"),
        # at 100 % the baseline sees no traffic: no PSI against it
        (canary_report(weight=1.0, hist=SHIFTED, baseline_requests=0), 1.0, 31, CANARY, PASS, "requests"),
        (canary_report(requests=5), 0.1, 31, CANARY, PROCEED_INSUFFICIENT, "only 5 of 20"),
        (canary_report(requests=5), 0.1, 31, CanaryConfig(bake_seconds=30, min_requests=20,
         on_insufficient_traffic="abort"), ABORT, "only 5 of 20"),
        (canary_report(weight=0.1), 0.5, 31, CANARY, ABORT, "no canary at weight 0.5"),
        (canary_report(state="aborted"), 0.1, 31, CANARY, ABORT, "state 'aborted'"),
    ],
)  # fmt: skip
def test_canary_verdicts(report, weight, seconds, config, status, reason):
    result = canary_verdict(report, config, weight, at(seconds))
    assert result["status"] == status
    assert any(reason in r for r in result["reasons"]), result["reasons"]
    assert result["metrics"]["weight"] == weight


def test_score_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    assert score_psi(SAME, [2 * v for v in SAME]) == 0
    assert score_psi(SAME, SHIFTED) > 1
    assert score_psi([], SAME) is None and score_psi([0] * 10, SAME) is None


def test_a_cloudwatch_alarm_in_alarm_aborts_and_wins_over_a_passing_local_verdict():
    alarms = [
        {"AlarmName": "m-v2-5xx", "StateValue": "ALARM", "StateReason": "5xx rate 0.02 > 0.001"},
        {"AlarmName": "m-v2-p99", "StateValue": "OK"},
    ]
    abort = alarm_verdict(alarms)
    assert abort["status"] == ABORT and "m-v2-5xx in ALARM: 5xx rate 0.02 > 0.001" in abort["reasons"][0]
    assert alarm_verdict([{**a, "StateValue": "OK"} for a in alarms]) is None
    assert alarm_verdict([{"AlarmName": "x", "StateValue": "INSUFFICIENT_DATA"}]) is None
    passing = release.verdict(PASS, ["fine"], {})
    assert combine(passing, abort)["status"] == ABORT
    assert combine(release.verdict(WAIT, ["baking"], {}), None)["status"] == WAIT
    assert combine(passing, None)["status"] == PASS


@pytest.mark.parametrize(
    ("response", "required", "approved", "outcome"),
    [
        (None, False, True, "not_required"),
        ({"chosen_options": ["Approve"], "responded_by_user": {"id": "1", "name": "ops"}}, True, True, "approved"),
        ({"chosen_options": ["Reject"], "responded_by_user": {"id": "1", "name": "ops"}}, True, False, "rejected"),
        # the scheduler's timeout sweep answers with the defaults (Reject) and no user
        ({"chosen_options": ["Reject"], "responded_by_user": None}, True, False, "timed_out"),
        (None, True, False, "timed_out"),  # no defaults: the approval task failed on its timeout
    ],
)
def test_approval_decisions(response, required, approved, outcome):
    decision = approval_decision(response, required=required)
    assert (decision.approved, decision.outcome) == (approved, outcome)


def test_release_config_parses_per_dataset_approval_and_rejects_bad_values():
    config = parse_release_config(
        {"approval": {"default": "auto", "datasets": {"intrusion_flows": "manual"}}, "canary": {"steps": [25, 100]}}
    )
    assert config.approval.mode_for("intrusion_flows") == "manual"
    assert config.approval.mode_for("network_security") == "auto"
    assert config.canary.steps == (25, 100)
    assert parse_release_config({"approval": "manual"}).approval.default == "manual"
    for raw, message in [
        ({"approval": "sometimes"}, "expected auto or manual"),
        ({"canary": {"steps": [50, 10, 100]}}, "rise strictly"),
        ({"canary": {"steps": [10, 50]}}, "to 100"),
        ({"shadow": {"on_insufficient_traffic": "maybe"}}, "proceed or abort"),
        ({"canary": {"thresholds": {"max_5xx_rate": 2}}}, "max_5xx_rate within"),
        ({"shadow": {"thresholds": {"agreement": 0.9}}}, "agreement"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_release_config(raw, "deploy.yaml")


def test_the_shipped_release_config_loads():
    config = release.load_release_config()
    assert config.canary.steps == (10, 50, 100)
    assert config.canary.thresholds.max_5xx_rate == 0.001
    assert config.shadow.on_insufficient_traffic in ("proceed", "abort")


def test_a_retrain_on_labels_is_not_judged_by_agreement_with_the_baseline_it_replaces():
    """Concept drift: the labels show the baseline wrong, so the candidate is meant to disagree with it."""
    from tasks.release import expects_new_behaviour

    assert expects_new_behaviour({"signals": ["quality"]}) and expects_new_behaviour({"signals": ["drift", "quality"]})
    assert not expects_new_behaviour({"signals": ["drift"]}) and not expects_new_behaviour({"run_type": "manual"})
    disagreeing = shadow_report(agreement=0.5, candidate_hist=SHIFTED)
    assert shadow_verdict(disagreeing, SHADOW, at(10))["status"] == ABORT
    kept = shadow_verdict(disagreeing, SHADOW, at(10), new_behaviour=True)
    assert kept["status"] == PASS and "not judged" in kept["reasons"][0]
    assert kept["metrics"]["agreement"] == 0.5 and kept["metrics"]["score_psi"] > 1  # still recorded
    # Errors and latency are still judged.
    assert shadow_verdict(shadow_report(failed=3), SHADOW, at(10), new_behaviour=True)["status"] == ABORT
    assert shadow_verdict(shadow_report(p99=900.0), SHADOW, at(10), new_behaviour=True)["status"] == ABORT


def test_a_canary_of_a_retrain_on_labels_is_judged_by_errors_and_latency_not_score_psi():
    shifted = canary_report(hist=SHIFTED)
    assert canary_verdict(shifted, CANARY, 0.1, at(31))["status"] == ABORT
    assert canary_verdict(shifted, CANARY, 0.1, at(31), new_behaviour=True)["status"] == PASS
    assert canary_verdict(canary_report(errors=1), CANARY, 0.1, at(31), new_behaviour=True)["status"] == ABORT
