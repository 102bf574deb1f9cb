"""The training DAG's approval task (Airflow's ApprovalOperator) on approve, reject and timeout.

``dag.test()`` leaves a human-in-the-loop task waiting for an answer from outside (the UI or the
REST API of an api-server), so the three answers are fed to the DAG's own operator the way
Airflow resumes it (``execute_complete`` with the response event, or the scheduler's timeout
sweep answering with the defaults), and what it returns is judged by ``tasks.release``.
"""

from __future__ import annotations

import datetime as dt
from unittest import mock

import pytest

from tasks.release import approval_decision

NOW = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def approval():
    from scripts.dag_runner import load_dag

    return load_dag("network_security_training").get_task("release.approve_release")


def resume(task, event):
    """Airflow resuming the parked task with ``event``; returns (XCom, the tasks it skipped)."""
    skipped: list[str] = []
    task = task.prepare_for_execution() if hasattr(task, "prepare_for_execution") else task
    context = {"ti": mock.Mock(), "task": task}
    with mock.patch.object(type(task), "skip", lambda self, ti, tasks: skipped.extend(t.task_id for t in tasks)):
        result = task.execute_complete(context, event)
    return result, skipped


def event(options, user):
    return {"chosen_options": options, "params_input": {}, "responded_at": NOW, "responded_by_user": user}


def test_approve_lets_the_release_go_on(approval):
    result, skipped = resume(approval, event(["Approve"], {"id": "1", "name": "ops"}))
    assert skipped == []
    decision = approval_decision(result, required=True)
    assert (decision.approved, decision.outcome) == (True, "approved")


def test_reject_skips_the_release_and_is_logged_as_rejected(approval):
    result, skipped = resume(approval, event(["Reject"], {"id": "1", "name": "ops"}))
    assert skipped == ["release.publish_image"]  # nothing ships; skips propagate from there
    decision = approval_decision(result, required=True)
    assert (decision.approved, decision.outcome, decision.reason) == (False, "rejected", "rejected by ops")


def test_a_timeout_answers_reject_by_default_and_is_logged_as_timed_out(approval):
    # The scheduler's AWAITING_INPUT sweep writes the defaults as the response, with no user.
    assert approval.defaults == ["Reject"] and approval.response_timeout.total_seconds() > 0
    result, skipped = resume(approval, event(approval.defaults, None))
    assert skipped == ["release.publish_image"]
    decision = approval_decision(result, required=True)
    assert (decision.approved, decision.outcome) == (False, "timed_out")


def test_the_prompt_links_the_model_card_and_the_gate_metrics(approval):
    from tasks.release import approval_prompt

    assert "approval_prompt" in approval.body
    prompt = approval_prompt(
        {"challenger_version": "3", "champion_version": "2", "decision": "promote", "primary_metric": "roc_auc",
         "challenger_metrics": {"roc_auc": 0.97}, "champion_metrics": {"roc_auc": 0.96}, "reasons": ["beats it"]},
        "http://mlflow/#/experiments/1/runs/r/artifacts",
    )  # fmt: skip
    assert "challenger 0.97, champion 0.96" in prompt and "Model card: http://mlflow" in prompt
