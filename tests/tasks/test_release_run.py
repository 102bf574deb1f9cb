"""The release's steps without Airflow: compare-and-swap on ``champion``, abort and completion records, outcomes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tasks import registry, release, release_run


@pytest.fixture
def model_registry(tmp_path, monkeypatch):
    """A sqlite MLflow registry with versions 1-3 of model ``m`` (no artifacts needed to move aliases)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("m", "champion", "1")
    return uri


def aliases(uri: str) -> dict[str, str | None]:
    from mlflow import MlflowClient

    from tasks.tracking import alias_version

    client = MlflowClient(tracking_uri=uri)
    return {alias: alias_version(client, "m", alias) for alias in ("champion", "previous_champion")}


def test_champion_moves_only_if_it_still_points_where_the_run_read_it(model_registry):
    moved = registry.promote(tracking_uri=model_registry, model_name="m", version="2", expected_champion="1")
    assert moved == {"champion_version": "2", "previous_champion_version": "1"}
    # A second run read v1 too, but v2 was released meanwhile: its v3 is not promoted over v2.
    with pytest.raises(registry.ChampionMoved, match="champion is v2 now, this run read v1"):
        registry.promote(tracking_uri=model_registry, model_name="m", version="3", expected_champion="1")
    assert aliases(model_registry) == {"champion": "2", "previous_champion": "1"}
    # A retried completion of the same release is a no-op, not a conflict.
    again = registry.promote(tracking_uri=model_registry, model_name="m", version="2", expected_champion="1")
    assert again["champion_version"] == "2"


class FakeServer:
    url = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def admin(self, method, path, body=None):
        self.calls.append((method, path))
        return {"state": "aborted", "baseline_version_now": "1"}


class FailingSsm:
    """SSM reporting the rollback script's exit 1 (moto reports every command as a success)."""

    class exceptions:  # noqa: N801 - boto3's shape
        InvocationDoesNotExist = KeyError

    def send_command(self, **kwargs):
        return {"Command": {"CommandId": "c-1"}}

    def get_command_invocation(self, CommandId, InstanceId):  # noqa: N803 - boto3's names
        return {"Status": "Failed", "StandardOutputContent": "rollback failed: no slot serves v1"}


CHOSEN = {"model_name": "m", "candidate_version": "2", "baseline_version": "1", "run_id": "r", "dag_run_id": "d",
          "first_release": False, "approval": "auto"}  # fmt: skip


def test_an_abort_sets_weight_0_everywhere_and_records_a_failed_ec2_rollback_as_failed(store, monkeypatch):
    recorded = []
    monkeypatch.setattr(registry, "record_release", lambda **kwargs: recorded.append(kwargs["outcome"]))
    plan = SimpleNamespace(model_name="m", settings=SimpleNamespace(mlflow_tracking_uri="sqlite://"))
    deployed = {"targets": ["local", "ec2"], "local": {"url": FakeServer.url}, "ec2": {"instance_ids": ["i-1"]}}
    verdict = release.verdict(release.ABORT, ["5xx rate 0.5000 above 0.001"], {"candidate_5xx": 10})
    server = FakeServer()
    outcome = release_run.abort(
        plan, store, CHOSEN, deployed, "canary_10", verdict, server=server, ssm=FailingSsm(), region="us-east-1"
    )
    assert server.calls == [("POST", "/admin/models/m/release/abort")]
    assert outcome["stage"] == "canary_10" and outcome["metrics"] == {"candidate_5xx": 10}
    assert outcome["targets"]["ec2"].startswith("rollback_failed")
    rows = {row["target"]: row for row in store.table("deployment_log")}
    assert rows["local"]["status"] == "rolled_back" and rows["ec2"]["status"] == "rollback_failed"
    assert rows["local"]["model_version"] == "1"  # what serves now
    assert json.loads(rows["local"]["detail"])["reasons"] == ["5xx rate 0.5000 above 0.001"]
    assert recorded[0]["outcome"] == "aborted"


@pytest.mark.parametrize(
    ("completed", "aborted", "approval", "response", "kind"),
    [
        ({"outcome": "completed"}, None, "auto", None, "completed"),
        (None, {"stage": "canary_10", "reasons": ["5xx"]}, "auto", None, "aborted"),
        (None, None, "manual", {"chosen_options": ["Reject"], "responded_by_user": {"name": "ops"}}, "not_released"),
        (None, None, "manual", {"chosen_options": ["Reject"], "responded_by_user": None}, "not_released"),
        (None, None, "manual", {"chosen_options": ["Approve"], "responded_by_user": {"name": "ops"}}, "incomplete"),
    ],
)
def test_the_outcome_of_a_release(completed, aborted, approval, response, kind):
    got, value = release_run.outcome_of({**CHOSEN, "approval": approval}, completed, aborted, response)
    assert got == kind
    if kind == "aborted":
        assert "aborted at canary_10" in value and "champion v1 still serves" in value
    if kind == "not_released":
        assert value.outcome == ("rejected" if response["responded_by_user"] else "timed_out")
    assert release_run.outcome_of(None, None, None, None)[0] == "no_candidate"


def test_a_retried_rollback_finds_its_own_rollback_done_and_another_one_is_refused(model_registry):
    registry.promote(tracking_uri=model_registry, model_name="m", version="2")
    first = registry.roll_back(tracking_uri=model_registry, model_name="m", reason="bad", request_id="run-1")
    assert first == {"champion_version": "1", "rolled_back_version": "2"}
    retried = registry.roll_back(tracking_uri=model_registry, model_name="m", reason="bad", request_id="run-1")
    assert retried == first  # the retried task goes on to the targets
    with pytest.raises(registry.NothingToRollBack, match="no previous_champion"):
        registry.roll_back(tracking_uri=model_registry, model_name="m", reason="again", request_id="run-2")


def test_a_completed_release_names_the_new_champion_and_where_it_serves():
    plan = SimpleNamespace(dataset="intrusion_flows", model_name="intrusion_flows", ds="2026-11-30")
    done = {"champion_version": "5", "previous_champion_version": "4"}
    deployed = {"targets": ["local", "ec2"], "local": {"url": "http://127.0.0.1:8000"}}
    champion, served = release_run.completion_events(plan, done, {"candidate_version": "5"}, deployed, {"run_id": "r1"})
    assert champion["version"] == "5" and champion["previous_version"] == "4" and champion["mlflow_run_id"] == "r1"
    assert served == {"model_name": "intrusion_flows", "model_version": "5", "targets": ["local", "ec2"],
                      "endpoint": "http://127.0.0.1:8000"}  # fmt: skip
    _, ec2_only = release_run.completion_events(
        plan, done, {"candidate_version": "5"}, {"targets": ["ec2"]}, {"run_id": "r1"}
    )
    assert ec2_only["endpoint"] is None


@pytest.mark.parametrize(("approval", "route"), [("manual", "approve_release"), ("auto", "publish_image")])
def test_a_manual_release_waits_for_a_human_and_an_auto_one_goes_straight_to_the_image(approval, route):
    assert release_run.approval_route({"approval": approval}) == route


@pytest.mark.parametrize(
    ("chosen", "completed", "aborted", "response", "error", "words"),
    [
        (None, None, None, None, "NothingReleased", "the gate kept the champion"),
        (CHOSEN, None, {"stage": "canary_10", "reasons": ["5xx"]}, None, "ReleaseStopped", "aborted at canary_10"),
        ({**CHOSEN, "approval": "manual"}, None, None, {"chosen_options": ["Approve"]}, "ReleaseStopped", "stopped"),
    ],
)
def test_a_release_that_did_not_complete_skips_or_fails_the_outcome(chosen, completed, aborted, response, error, words):
    from tasks import delivery

    expected = {"NothingReleased": delivery.NothingReleased, "ReleaseStopped": release_run.ReleaseStopped}[error]
    with pytest.raises(expected, match=words):
        release_run.finish(None, None, {}, "d", chosen, completed, aborted, response)


def test_a_completed_release_is_the_outcome():
    done = {"outcome": "completed", "champion_version": "2"}
    assert release_run.finish(None, None, {}, "d", CHOSEN, done, None, None) == done


@pytest.mark.parametrize(("stage", "words"), [("shadow", "shadow: "), ("canary_50", "canary 50 %: ")])
def test_each_stage_pokes_its_own_check(stage, words):
    plan = SimpleNamespace(model_name="m", trigger={})
    clients = {"server": None, "ssm": None, "cloudwatch": None, "region": "us-east-1"}
    verdict = release_run.stage_poke(stage, plan, {**CHOSEN, "first_release": True}, {"targets": []}, **clients)
    assert verdict["reasons"][0].startswith(words)
    assert release.done(verdict)


def test_the_candidate_ships_as_its_own_version_and_only_to_the_targets_given():
    assert release_run.candidate_release(CHOSEN)["model_version"] == "2"
    nothing = release_run.deploy_candidate(
        SimpleNamespace(model_name="m"), CHOSEN, {"image_uri": "i"}, server=None, ec2=None, ssm=None, cloudwatch=None,
        region="us-east-1",
    )  # fmt: skip
    assert nothing == {"targets": []}


def test_without_a_candidate_the_image_step_skips_and_touches_no_registry():
    """The gate kept the champion: ``publish_image`` still runs (its trigger rule, the plan upstream) and must
    skip, not fail three times on the missing candidate."""
    from tasks import delivery

    class NoRegistry:
        def __getattr__(self, name):
            raise AssertionError(f"ECR called: {name}")

    with pytest.raises(delivery.NothingReleased, match="the gate kept the champion"):
        release_run.publish_candidate(NoRegistry(), None)
