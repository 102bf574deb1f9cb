"""Delivery plane: releases on live evidence with ``dag.test()`` on the real stack.

One story, in order, on a registered model of its own, with a client sending requests while each
release runs: the first champion ships (no baseline: the stages have nothing to compare); a good
release passes shadow and every canary step and ends serving 100 % with ``champion`` moved; a
release whose canary answers 5xx (fault injection) is aborted automatically, the previous version
serves 100 %, ``champion`` never moved and every request got an answer; the same abort driven by a
CloudWatch alarm on the EC2 path (moto); then the deploy DAG (``make rollback`` / ``make deploy``).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time

import boto3
import httpx
import pytest

from tasks.config import DEPLOY_DAG_ID, TRAINING_DAG_ID, Settings
from tasks.datagen import generate, publish_drop
from tasks.dataset_spec import load_spec
from tasks.deploy import load_deploy_config, release_alarm_names, release_tag
from tasks.layout import DayLayout
from tests.dag_runs import run_dag

pytestmark = pytest.mark.integration

MODEL = "ns_delivery_test"
SPEC = load_spec("network_security")
ROWS = 1500
CONFIG = load_deploy_config().for_model(MODEL)  # its own repository and fleet
FORCE = {"force_gate": "promote", "force_reason": "delivery test: ship a new version"}
STAGES = ["release.shadow", "release.canary_10", "release.canary_50", "release.canary_100"]


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", MODEL)
        patch.setenv("NS_DEPLOY_TARGETS", "local,ec2")
        patch.setenv("NS_SERVING_FAULT_INJECTION", "true")  # lets the bad release ask for a faulty candidate
        yield


@pytest.fixture(scope="module")
def aws(local_stack):
    def client(name: str):
        return boto3.client(
            name,
            endpoint_url=local_stack["AWS_ENDPOINT_URL"],
            aws_access_key_id=local_stack["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=local_stack["AWS_SECRET_ACCESS_KEY"],
            region_name=local_stack["AWS_DEFAULT_REGION"],
        )

    return client


@pytest.fixture(scope="module")
def server(local_stack):
    return httpx.Client(
        base_url=f"http://127.0.0.1:{local_stack['SERVING_PORT']}",
        headers={"X-API-Key": local_stack["NS_SERVING_API_KEY"]},
        timeout=30,
    )


RECORD = {k: int(v) for k, v in generate(SPEC, 1, seed=5).drop(columns=[SPEC.target.name]).iloc[0].items()}


class Client(threading.Thread):
    """Sends predictions back to back while a release runs; records every answer (or its absence)."""

    def __init__(self, base_url: str, api_key: str, admin_key: str) -> None:
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=base_url, headers={"X-API-Key": api_key}, timeout=10)
        self.admin_key = admin_key
        self.stop = threading.Event()
        self.answers: list[tuple[int, str | None]] = []
        self.unanswered: list[str] = []

    def releasing(self) -> bool:
        try:
            state = self.http.get(f"/admin/models/{MODEL}/release", headers={"X-API-Key": self.admin_key})
            return state.status_code == 200 and state.json().get("state") == "running"
        except httpx.HTTPError:
            return False

    def run(self) -> None:
        # Slow while the run trains (2 shared cores), back to back once a release runs.
        fast, checked = False, 0.0
        while not self.stop.is_set():
            if time.monotonic() - checked > 0.5:
                fast, checked = self.releasing(), time.monotonic()
            if not fast:
                time.sleep(0.2)
            try:
                response = self.http.post("/predict", json=RECORD)
            except httpx.HTTPError as err:
                self.unanswered.append(repr(err))
                time.sleep(0.05)
                continue
            version = response.json().get("model_version") if response.status_code == 200 else None
            self.answers.append((response.status_code, version))
            if response.status_code == 503:
                time.sleep(0.05)  # no model yet (the first release)

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(15)


@pytest.fixture(scope="module")
def traffic(local_stack):
    def client() -> Client:
        return Client(
            f"http://127.0.0.1:{local_stack['SERVING_PORT']}",
            local_stack["NS_SERVING_API_KEY"],
            local_stack["NS_SERVING_ADMIN_API_KEY"],
        )

    return client


def _train(s3, ds: str, conf: dict | None = None):
    publish_drop(s3, DayLayout(Settings(), SPEC, ds), rows=ROWS)
    return run_dag(TRAINING_DAG_ID, ds, conf=conf)


def _aliases() -> dict[str, str | None]:
    from mlflow import MlflowClient

    from tasks.tracking import alias_version

    client = MlflowClient()
    return {alias: alias_version(client, MODEL, alias) for alias in ("champion", "previous_champion")}


def _deployments(local_stack, run_id: str | None = None) -> list[dict]:
    with sqlite3.connect(local_stack["NS_MONITORING_DB"]) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT * FROM deployment_log WHERE model_name = ? ORDER BY recorded_at, target", (MODEL,)
        )
        return [dict(row) for row in rows if run_id is None or row["dag_run_id"] == run_id]


def _served_version(server) -> str:
    # The model's own route: the one local server serves every dataset's model side by side.
    return server.get(f"/models/{MODEL}").json()["model_version"]


def _release_state(server, local_stack) -> dict:
    admin = {"X-API-Key": local_stack["NS_SERVING_ADMIN_API_KEY"]}
    return server.get(f"/admin/models/{MODEL}/release", headers=admin).json()


def _sent_commands(aws, instance_id: str) -> list[str]:
    commands = aws("ssm").list_commands(InstanceId=instance_id)["Commands"]
    return ["\n".join(c["Parameters"]["commands"]) for c in commands]


def _model_card(version: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    run_id = MlflowClient().get_model_version(MODEL, version).run_id
    return mlflow.artifacts.load_text(f"runs:/{run_id}/model_card.md")


@pytest.fixture(scope="module")
def first_release(s3, local_stack):
    report = _train(s3, "2026-08-01")
    assert report.succeeded, report.task_states
    return report


def test_first_champion_is_shipped_to_ecr_ec2_and_the_local_server(first_release, aws, server, local_stack):
    version = first_release.outputs["train"]["model_version"]
    assert first_release.task_states["release.abort"] == "skipped"
    assert first_release.task_states["release.approve_release"] == "skipped"  # approval: auto
    for stage in STAGES:  # nothing to compare with: each stage says so and passes
        assert first_release.outputs[stage]["status"] == "skipped"
        assert "first release" in first_release.outputs[stage]["reasons"][0]
    assert _aliases()["champion"] == version
    assert first_release.outputs["release.outcome"]["outcome"] == "completed"

    ecr = aws("ecr")
    repository = ecr.describe_repositories(repositoryNames=[CONFIG.ecr.repository])["repositories"][0]
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert repository["imageScanningConfiguration"]["scanOnPush"] is True
    tag = release_tag(MODEL, version)
    image = first_release.outputs["release.publish_image"]
    assert image["image_uri"] == f"{repository['repositoryUri']}:{tag}"
    assert image["how"] == "manifest"  # no Docker engine here: the manifest is recorded

    deployed = first_release.outputs["release.deploy_candidate"]
    (instance_id,) = deployed["ec2"]["instance_ids"]
    ec2 = aws("ec2")
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert {t["Key"]: t["Value"] for t in instance["Tags"]} == CONFIG.ec2.tags
    user_data = base64.b64decode(
        ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    ).decode()
    assert "dnf install -y docker nginx" in user_data and "amazon-cloudwatch-agent" in user_data
    assert f"MLFLOW_TRACKING_URI={local_stack['MLFLOW_TRACKING_URI']}" in user_data
    sent = _sent_commands(aws, instance_id)
    assert any("ACTION=stage" in c and f"MODEL_VERSION={version}" in c for c in sent)
    assert any("ACTION=complete" in c for c in sent)
    assert deployed["ec2"]["alarms"] == release_alarm_names(MODEL, version)

    assert _served_version(server) == version
    record = generate(SPEC, 1, seed=5).drop(columns=[SPEC.target.name]).iloc[0].to_dict()
    answer = server.post(f"/models/{MODEL}/predict", json={k: int(v) for k, v in record.items()})
    assert answer.status_code == 200 and answer.json()["model_version"] == version
    assert server.post(f"/models/{MODEL}/predict", json=record, headers={"X-API-Key": "wrong"}).status_code == 403

    rows = _deployments(local_stack, first_release.run_id)
    assert {(r["target"], r["action"], r["status"], r["model_version"]) for r in rows} == {
        ("ec2", "release", "deployed", version),
        ("local", "release", "deployed", version),
    }


def test_a_good_release_passes_shadow_and_every_canary_step_and_moves_champion(first_release, s3, server, traffic,
                                                                              local_stack):  # fmt: skip
    baseline = _aliases()["champion"]
    with traffic() as client:
        report = _train(s3, "2026-08-02", conf=FORCE)
    assert report.succeeded, report.task_states
    version = report.outputs["train"]["model_version"]
    shadow = report.outputs["release.shadow"]
    assert shadow["status"] == "pass", shadow
    assert shadow["metrics"]["shadowed_rows"] >= 100 and shadow["metrics"]["agreement"] >= 0.9
    for percent in (10, 50, 100):
        step = report.outputs[f"release.canary_{percent}"]
        assert step["status"] == "pass", step
        assert step["metrics"]["weight"] == percent / 100 and step["metrics"]["candidate_5xx"] == 0
    assert _aliases() == {"champion": version, "previous_champion": baseline}
    assert _served_version(server) == version
    assert _release_state(server, local_stack)["state"] == "completed"
    assert not client.unanswered and {status for status, _ in client.answers} == {200}
    assert {v for _, v in client.answers} == {baseline, version}  # both served during the canary
    assert "Outcome: **completed**" in _model_card(version)


def test_a_canary_past_the_5xx_threshold_is_aborted_and_the_previous_version_serves(first_release, s3, server, traffic,
                                                                                    local_stack):  # fmt: skip
    before = _aliases()
    conf = {**FORCE, "release_fault": {"error_rate": 0.5}}
    with traffic() as client:
        report = _train(s3, "2026-08-03", conf=conf)
        after_abort = len(client.answers)
        time.sleep(1)  # still sending after the abort
    broken = report.outputs["train"]["model_version"]

    assert not report.succeeded, "an aborted release fails the run"
    assert report.outputs["release.shadow"]["status"] == "pass"  # the fault is the canary's only
    assert report.task_states["release.canary_10"] == "failed"
    assert report.task_states["release.canary_50"] == "upstream_failed"
    assert report.task_states["release.complete"] == "upstream_failed"
    assert report.task_states["release.abort"] == "success"
    aborted = report.outputs["release.abort"]
    assert aborted["stage"] == "canary_10" and "5xx rate" in aborted["reasons"][0]
    assert aborted["metrics"]["candidate_5xx"] > 0
    assert _aliases() == before  # champion never moved
    assert _served_version(server) == before["champion"]
    state = _release_state(server, local_stack)
    assert state["state"] == "aborted" and state["candidate_version"] == broken

    assert not client.unanswered, client.unanswered[:3]  # every request got an answer
    late = client.answers[after_abort:]
    assert late and all(answer == (200, before["champion"]) for answer in late)  # 100 % on the baseline
    rows = _deployments(local_stack, report.run_id)
    assert {(r["target"], r["action"], r["status"]) for r in rows} == {
        ("local", "rollback", "rolled_back"),
        ("ec2", "rollback", "rolled_back"),
    }
    assert "5xx rate" in json.loads(rows[0]["detail"])["reasons"][0]
    assert "Outcome: **aborted** at stage `canary_10`" in _model_card(broken)


def test_a_cloudwatch_alarm_aborts_the_canary_on_the_ec2_path(first_release, s3, aws, server, traffic, local_stack):
    before = _aliases()
    cloudwatch = aws("cloudwatch")
    fired: list[str] = []

    existing = {a["AlarmName"] for a in cloudwatch.describe_alarms(AlarmNamePrefix=MODEL)["MetricAlarms"]}

    done = threading.Event()

    def fire_the_alarm() -> None:  # as CloudWatch would once the fleet's canary 5xx rate passed 0.1 %
        while not done.is_set() and not fired:
            for alarm in cloudwatch.describe_alarms(AlarmNamePrefix=MODEL)["MetricAlarms"]:
                if alarm["AlarmName"] not in existing:
                    cloudwatch.set_alarm_state(
                        AlarmName=alarm["AlarmName"], StateValue="ALARM", StateReason="5xx rate 0.02 > 0.001"
                    )
                    fired.append(alarm["AlarmName"])
            time.sleep(0.5)

    firing = threading.Thread(target=fire_the_alarm, daemon=True)
    firing.start()
    with traffic() as client:
        report = _train(s3, "2026-08-04", conf=FORCE)
    done.set()
    firing.join(5)
    version = report.outputs["train"]["model_version"]
    assert fired == release_alarm_names(MODEL, version)
    assert not report.succeeded
    aborted = report.outputs["release.abort"]
    assert aborted["stage"] == "canary_10" and "in ALARM: 5xx rate 0.02 > 0.001" in aborted["reasons"][0]
    assert _aliases() == before and _served_version(server) == before["champion"]
    assert not client.unanswered
    instance_id = report.outputs["release.deploy_candidate"]["ec2"]["instance_ids"][0]
    rollback = [c for c in _sent_commands(aws, instance_id) if "ACTION=rollback" in c]
    assert rollback and f"MODEL_VERSION={before['champion']}" in rollback[0]  # nginx back on the baseline's slot


def test_deploy_dag_rollback_serves_previous_champion(server):
    aliases = _aliases()
    rolled = run_dag(DEPLOY_DAG_ID, "2026-08-07", conf={"action": "rollback", "reason": "operator test"})
    assert rolled.succeeded, rolled.task_states
    assert rolled.outputs["choose_release"]["champion_version"] == aliases["previous_champion"]
    assert _aliases()["champion"] == aliases["previous_champion"]
    assert _served_version(server) == aliases["previous_champion"]


def test_deploy_dag_refuses_a_rollback_without_target_and_redeploys_the_champion(server, local_stack):
    champion = _aliases()["champion"]
    refused = run_dag(DEPLOY_DAG_ID, "2026-08-08", conf={"action": "rollback", "reason": "operator test"})
    assert not refused.succeeded
    assert refused.task_states["choose_release"] == "failed"
    assert _aliases()["champion"] == champion

    # The server is gone (e.g. after a reboot); redeploying brings the champion back.
    from scripts.services import Paths
    from scripts.stack import model_servers

    for model_server in model_servers(Paths.from_env()):
        model_server.stop()
    with pytest.raises(httpx.TransportError):
        server.get("/health", timeout=2)
    redeployed = run_dag(DEPLOY_DAG_ID, "2026-08-09", conf={"action": "redeploy"})
    assert redeployed.succeeded, redeployed.task_states
    assert redeployed.outputs["deploy.serve_local"]["process"] == "started"
    assert _served_version(server) == champion
