"""The deploy group's steps without Airflow: target choice, smoke sample, deployment rows, the rollback."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks import delivery
from tasks.config import Settings
from tasks.datagen import generate
from tasks.plan import plan_run

RELEASE = {"model_name": "network_security", "model_version": "7", "run_id": "r", "git_sha": "abc"}
IMAGE = {"image_uri": "123.dkr.ecr.us-east-1.amazonaws.com/serving:network-security-v7"}


def plan(targets: str = "local,ec2"):
    return plan_run(Settings(deploy_targets=targets), {}, "2026-01-31", "manual", ["network_security"])


@pytest.mark.parametrize(("targets", "target", "selected"), [("local,ec2", "ec2", True), ("local", "ec2", False)])
def test_require_target(targets, target, selected):
    if selected:
        delivery.require_target(plan(targets), target)
    else:
        with pytest.raises(delivery.TargetNotSelected, match="'ec2' is not in deploy_targets='local'"):
            delivery.require_target(plan(targets), target)


def test_smoke_records_are_a_fixed_sample_with_their_labels(network_spec):
    test = generate(network_spec, 200, seed=3)
    records, labels = delivery.smoke_records(test, network_spec, 64)
    again, _ = delivery.smoke_records(test, network_spec, 64)
    assert len(records) == len(labels) == 64 and records == again
    assert set(records[0]) == set(network_spec.feature_names)
    frame = pd.DataFrame(records)
    matched = test.merge(frame.assign(label=labels), on=network_spec.feature_names)
    assert (matched[network_spec.target.name] == matched["label"]).all()
    assert len(delivery.smoke_records(test.head(10), network_spec, 64)[0]) == 10


def test_deployed_rows_one_per_target_that_shipped():
    fleet = {"instance_ids": ["i-1", "i-2"]}
    local = {"url": "http://127.0.0.1:8000", "old_version": "6", "new_version": "7"}
    smoke = {"accuracy": 0.97}
    rows = delivery.deployed_rows(
        dag_run_id="run", release=RELEASE, image=IMAGE, fleet=fleet, rollout_command_id="cmd-1",
        local=local, smoke=smoke, recorded_at="t",
    )  # fmt: skip
    assert [r["target"] for r in rows] == ["ec2", "local"]
    assert "on 2 instance(s) (SSM command cmd-1)" in rows[0]["detail"]
    assert json.loads(rows[0]["instance_ids"]) == ["i-1", "i-2"]
    assert rows[1]["endpoint"] == local["url"] and '"accuracy": 0.97' in rows[1]["detail"]
    only_local = delivery.deployed_rows(
        dag_run_id="run", release=RELEASE, image=IMAGE, fleet=None, rollout_command_id=None,
        local=local, smoke=smoke,
    )  # fmt: skip
    assert [r["target"] for r in only_local] == ["local"] and only_local[0]["recorded_at"]


def test_record_deployment_writes_the_rows_and_says_what_serves_where(store):
    rows = delivery.deployed_rows(
        dag_run_id="run", release=RELEASE, image=IMAGE, fleet={"instance_ids": ["i-1"]}, rollout_command_id=None,
        local={"url": "http://x", "old_version": "6", "new_version": "7"}, smoke={}, recorded_at="t",
    )  # fmt: skip
    recorded = delivery.record_deployment(store, rows, RELEASE)
    assert recorded == {
        "model_name": "network_security", "model_version": "7", "image_uri": IMAGE["image_uri"],
        "targets": ["ec2", "local"], "endpoint": "http://x",
    }  # fmt: skip
    assert len(store.table("deployment_log")) == 2


def test_a_smoke_test_without_its_held_out_split_says_what_to_do(buckets):
    from tasks.deploy import SmokeTestFailed

    release = {**RELEASE, "test_uri": "s3://network-security-lake/features/network_security/ds=2026-01-31/test.parquet"}
    with pytest.raises(SmokeTestFailed, match=r"held-out split of v7 .* is not in S3.*`make run`"):
        delivery.smoke(plan(), buckets, release, {"url": "http://127.0.0.1:9"}, "key")


def test_two_models_ship_to_their_own_repository_and_fleet(monkeypatch, aws_isolation):
    """EC2 path: each model's image in its own ECR repository, its rollout (and rollback) on its own tagged fleet."""
    import boto3
    from moto import mock_aws

    from tasks import deploy, release_run

    monkeypatch.setattr(deploy, "docker_engine_available", lambda timeout=10.0: False)  # manifest mode
    known = ["intrusion_flows", "network_security"]
    shipped = {}
    sent = []  # the SendCommand requests as sent: moto 5.2.5 records every instance of the account on each
    with mock_aws():
        ecr, ec2, ssm = (boto3.client(name, region_name="us-east-1") for name in ("ecr", "ec2", "ssm"))
        ssm.meta.events.register(
            "provide-client-params.ssm.SendCommand", lambda params, **kwargs: sent.append(dict(params))
        )
        for dataset in known:
            run = plan_run(Settings(deploy_targets="ec2"), {"dataset": dataset}, "2026-01-31", "manual", known)
            release = {**RELEASE, "model_name": run.model_name, "model_version": "2"}
            image = delivery.publish(ecr, release)
            fleet = delivery.fleet(run, ec2, ssm, "us-east-1", release, image)
            command = deploy.send_commands(ssm, fleet["instance_ids"], fleet["commands"], comment=f"{dataset} rollout")
            shipped[dataset] = {"run": run, "release": release, "image": image, "fleet": fleet, "command": command}
        # The second model's deploy did not touch the first one's fleet; a rollback of it neither.
        flows = shipped["intrusion_flows"]
        release_run.ec2_command(flows["run"], ssm, flows["fleet"], "rollback", "1", "us-east-1")
        tags = {
            instance["InstanceId"]: {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
            for reservation in ec2.describe_instances()["Reservations"]
            for instance in reservation["Instances"]
        }
        repositories = {r["repositoryName"] for r in ecr.describe_repositories()["repositories"]}
    network, flows = shipped["network_security"], shipped["intrusion_flows"]
    assert repositories == {"network-security-serving", "intrusion-flows-serving"}
    assert network["image"]["repository"] == "network-security-serving"
    assert flows["image"]["image_uri"].endswith("/intrusion-flows-serving:intrusion-flows-v2")
    (network_host,), (flows_host,) = network["fleet"]["instance_ids"], flows["fleet"]["instance_ids"]
    assert network_host != flows_host
    assert (
        tags[network_host]["Name"] == "network-security-serving"
        and tags[flows_host]["Name"] == "intrusion-flows-serving"
    )
    assert [(c["Comment"], c["InstanceIds"]) for c in sent] == [
        ("intrusion_flows rollout", [flows_host]),
        ("network_security rollout", [network_host]),
        ("intrusion_flows rollback v1 ", [flows_host]),  # the other model's fleet is sent nothing
    ]
    assert "IMAGE_URI=" + flows["image"]["image_uri"] in sent[0]["Parameters"]["commands"]
    assert "IMAGE_URI=" + network["image"]["image_uri"] in sent[1]["Parameters"]["commands"]


@pytest.mark.parametrize(
    ("password", "extra", "missing"), [(None, {"admin_api_key": "a"}, "no password"), ("k", None, "admin_api_key")]
)
def test_the_model_server_takes_its_keys_from_the_serving_connection(password, extra, missing):
    from types import SimpleNamespace

    connection = SimpleNamespace(host=None, port=None, password=password, extra_dejson=extra)
    with pytest.raises(ValueError, match=missing):
        delivery.model_server_on(plan(), connection, {})


@pytest.mark.parametrize(
    ("targets", "wanted"),
    [
        ("local,ec2", {"s3", "region", "store", "server", "api_key", "ec2", "ssm", "cloudwatch", "ecr"}),
        ("local", {"s3", "region", "store", "server", "api_key", "ecr"}),
        ("ec2", {"s3", "region", "store", "ec2", "ssm", "cloudwatch", "ecr"}),
    ],
)
def test_a_step_gets_the_clients_of_the_targets_the_plan_ships_to(targets, wanted):
    names = {"s3", "region", "store", "server", "api_key", "ec2", "ssm", "cloudwatch", "ecr"}
    assert {name for name in names if delivery.client_wanted(plan(targets), name)} == wanted


def test_record_writes_a_row_per_target_that_shipped_and_says_what_serves_where(store):
    local = {"url": "http://x", "old_version": "6", "new_version": "7"}
    recorded = delivery.record(store, "run", RELEASE, IMAGE, None, None, local, {"accuracy": 1.0})
    assert recorded["targets"] == ["local"] and recorded["endpoint"] == "http://x"
    (row,) = store.table("deployment_log")
    assert row["dag_run_id"] == "run" and row["target"] == "local" and '"accuracy": 1.0' in row["detail"]
