"""Delivery without a network: the deploy config, ECR/EC2/SSM against moto, the shell scripts, the smoke test."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto import mock_aws

from tasks import deploy
from tasks.dataset_spec import PROJECT_ROOT
from tasks.deploy import (
    DEPLOY_CONFIG,
    OCI_MANIFEST,
    DeployConfig,
    DeployFailed,
    Ec2Config,
    EcrConfig,
    SmokeTestFailed,
    ensure_instances,
    ensure_repository,
    load_deploy_config,
    parse_targets,
    publish_image,
    release_tag,
    rollout_commands,
    smoke_test,
    source_digest,
    user_data,
)

REGION = "us-east-1"
AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def aws(aws_isolation: None) -> Iterator[dict[str, Any]]:
    """ECR, EC2 and SSM clients on moto's in-process mock (the isolation of tests/conftest.py)."""
    with mock_aws():
        yield {name: boto3.client(name, region_name=REGION) for name in ("ecr", "ec2", "ssm", "cloudwatch")}


def write_config(tmp_path: Path, mutate: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The shipped deploy.yaml, changed by ``mutate``, written under ``tmp_path``."""
    raw = yaml.safe_load(DEPLOY_CONFIG.read_text())
    if mutate is not None:
        mutate(raw)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def bash_syntax_ok(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.sh"
    path.write_text(script)
    return subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)


# --- load_deploy_config -----------------------------------------------------------------


def test_shipped_deploy_config_loads_with_its_values():
    config = load_deploy_config()
    assert isinstance(config, DeployConfig)
    config = config.for_model("network_security")
    assert config.ecr == EcrConfig(
        repository="network-security-serving", scan_on_push=True, tag_mutability="IMMUTABLE", build="auto"
    )
    assert config.ec2.tags == {
        "Name": "network-security-serving",
        "Project": "network-security",
        "Role": "model-server",
    }
    assert config.ec2.slot_ports == (8001, 8002)
    assert config.ec2.instance_type == "t3.small"
    assert config.ec2.ami_parameter == AMI_PARAMETER
    assert config.ec2.api_key_parameter == "/network-security/serving/api-key"
    assert (config.smoke.records, config.smoke.min_accuracy, config.smoke.timeout_seconds) == (64, 0.8, 60)


def test_each_model_has_its_own_repository_and_fleet():
    config = load_deploy_config()
    flows, network = config.for_model("intrusion_flows"), config.for_model("network_security")
    assert (flows.ecr.repository, network.ecr.repository) == ("intrusion-flows-serving", "network-security-serving")
    assert flows.ec2.tags["Name"] == "intrusion-flows-serving" != network.ec2.tags["Name"]
    assert flows.ec2.slot_ports == network.ec2.slot_ports and flows.smoke == network.smoke


def test_a_models_overrides_apply_to_that_model_only(tmp_path):
    def mutate(raw):
        raw["models"] = {"flows": {"ecr": {"repository": "flows-images"}, "ec2": {"tags": {"Fleet": "f"}}}}

    config = load_deploy_config(write_config(tmp_path, mutate))
    flows, other = config.for_model("flows"), config.for_model("other")
    assert (flows.ecr.repository, flows.ec2.tags) == ("flows-images", {"Fleet": "f"})
    assert (other.ecr.repository, other.ec2.tags["Name"]) == ("other-serving", "other-serving")


@pytest.mark.parametrize(
    ("models", "words"),
    [
        ({"flows": {"smoke": {"records": 1}}}, "overrides the ecr and ec2 sections only"),
        ({"flows": {"ecr": {"repo": "x"}}}, "unexpected keyword argument 'repo'"),
        ({"flows": {"ec2": {"tags": {}}}}, "ec2.tags must be a non-empty mapping"),
    ],
)
def test_a_bad_model_override_names_the_file(tmp_path, models, words):
    path = write_config(tmp_path, lambda raw: raw.update(models=models))
    with pytest.raises(ValueError, match=words) as raised:
        load_deploy_config(path)
    assert str(path) in str(raised.value)


def test_a_repository_template_is_never_created():
    with pytest.raises(ValueError, match="is a template: use DeployConfig.for_model"):
        ensure_repository(None, load_deploy_config().ecr)


def test_a_copy_of_the_shipped_config_loads_identically(tmp_path):
    assert load_deploy_config(write_config(tmp_path)) == load_deploy_config()


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("")
    assert load_deploy_config(path) == DeployConfig()


def test_config_values_are_normalised(tmp_path):
    def mutate(raw):
        raw["ec2"]["slot_ports"] = ["9001", 9002]
        raw["ec2"]["tags"] = {"Name": "x", "Tier": 3}

    config = load_deploy_config(write_config(tmp_path, mutate))
    assert config.ec2.slot_ports == (9001, 9002)
    assert config.ec2.tags == {"Name": "x", "Tier": "3"}


def _set(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw[section][key] = value

    return mutate


MALFORMED = {
    "bad ecr.build": (_set("ecr", "build", "podman"), "ecr.build"),
    "bad tag_mutability": (_set("ecr", "tag_mutability", "immutable"), "tag_mutability"),
    "one slot port": (_set("ec2", "slot_ports", [8001]), "slot_ports"),
    "three slot ports": (_set("ec2", "slot_ports", [8001, 8002, 8003]), "slot_ports"),
    "duplicate slot ports": (_set("ec2", "slot_ports", [8001, 8001]), "slot_ports"),
    "non-numeric slot port": (_set("ec2", "slot_ports", ["blue", "green"]), "blue"),
    "empty ec2 tags": (_set("ec2", "tags", {}), "ec2.tags"),
    "min_accuracy above 1": (_set("smoke", "min_accuracy", 1.5), "min_accuracy"),
    "min_accuracy below 0": (_set("smoke", "min_accuracy", -0.1), "min_accuracy"),
    "records 0": (_set("smoke", "records", 0), "smoke.records"),
    "unknown ecr key": (_set("ecr", "registry", "elsewhere"), "registry"),
    "unknown smoke key": (_set("smoke", "min_acuracy", 0.9), "min_acuracy"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_config_fails_naming_file_and_key(tmp_path, case):
    mutate, fragment = MALFORMED[case]
    path = write_config(tmp_path, mutate)
    with pytest.raises(ValueError) as raised:
        load_deploy_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message


@pytest.mark.parametrize("tags", [None, ["Name", "x"]], ids=["null", "list"])
def test_tags_that_are_not_a_mapping_fail_as_value_error_naming_the_file(tmp_path, tags):
    path = write_config(tmp_path, _set("ec2", "tags", tags))
    with pytest.raises(ValueError, match="ec2.tags") as raised:
        load_deploy_config(path)
    assert str(path) in str(raised.value)


def test_unknown_top_level_section_fails(tmp_path):
    def mutate(raw):
        raw["smoek"] = raw.pop("smoke")

    with pytest.raises(ValueError, match="smoek"):
        load_deploy_config(write_config(tmp_path, mutate))


# --- parse_targets and release_tag ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("local,ec2", ("local", "ec2")),
        ("ec2,local", ("ec2", "local")),
        (" ec2 ", ("ec2",)),
        ("local, ec2 ,", ("local", "ec2")),
        ("", ()),
        (" , ", ()),
        ("ec2,ec2,local,ec2", ("ec2", "local")),
    ],
)
def test_parse_targets(value, expected):
    assert parse_targets(value) == expected


def test_parse_targets_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError) as raised:
        parse_targets("local,kubernetes,ecs")
    message = str(raised.value)
    assert "['ecs', 'kubernetes']" in message
    assert "known: ['local', 'ec2']" in message
    assert "local,kubernetes,ecs" in message


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [
        ("network_security", "3", "network-security-v3"),
        ("Intrusion_Flows", "12", "intrusion-flows-v12"),
        ("plain", "1", "plain-v1"),
    ],
)
def test_release_tag(model, version, expected):
    assert release_tag(model, version) == expected


# --- ECR ----------------------------------------------------------------------------------


def describe_repository(ecr: Any, name: str) -> dict[str, Any]:
    return ecr.describe_repositories(repositoryNames=[name])["repositories"][0]


def test_ensure_repository_creates_scanned_immutable_repository(aws):
    ecr = aws["ecr"]
    created = ensure_repository(ecr, EcrConfig(repository="serving"))
    described = describe_repository(ecr, "serving")
    assert described["imageTagMutability"] == "IMMUTABLE"
    assert described["imageScanningConfiguration"] == {"scanOnPush": True}
    assert created["repositoryUri"] == described["repositoryUri"]
    assert created["repositoryUri"].endswith(".amazonaws.com/serving")


def test_ensure_repository_is_idempotent(aws):
    ecr = aws["ecr"]
    first = ensure_repository(ecr, EcrConfig(repository="serving"))
    second = ensure_repository(ecr, EcrConfig(repository="serving"))
    assert second["repositoryUri"] == first["repositoryUri"]
    assert second["imageTagMutability"] == "IMMUTABLE"
    assert [r["repositoryName"] for r in ecr.describe_repositories()["repositories"]] == ["serving"]


def test_ensure_repository_aligns_an_existing_repository(aws):
    ecr = aws["ecr"]
    ecr.create_repository(
        repositoryName="serving",
        imageTagMutability="MUTABLE",
        imageScanningConfiguration={"scanOnPush": False},
    )
    result = ensure_repository(ecr, EcrConfig(repository="serving"))
    described = describe_repository(ecr, "serving")
    assert described["imageTagMutability"] == "IMMUTABLE"
    assert described["imageScanningConfiguration"] == {"scanOnPush": True}
    assert result["imageTagMutability"] == "IMMUTABLE"
    assert result["imageScanningConfiguration"] == {"scanOnPush": True}


def test_ensure_repository_aligns_towards_mutable_and_unscanned_when_configured(aws):
    ecr = aws["ecr"]
    ensure_repository(ecr, EcrConfig(repository="serving"))
    ensure_repository(ecr, EcrConfig(repository="serving", tag_mutability="MUTABLE", scan_on_push=False))
    described = describe_repository(ecr, "serving")
    assert described["imageTagMutability"] == "MUTABLE"
    assert described["imageScanningConfiguration"] == {"scanOnPush": False}


def stored_manifest(ecr: Any, repository: str, tag: str) -> dict[str, Any]:
    image = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageTag": tag}])["images"][0]
    assert image["imageManifestMediaType"] == OCI_MANIFEST
    return json.loads(image["imageManifest"])


def test_publish_image_records_an_oci_manifest_without_docker(aws, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"manifest mode must not run {args}")

    monkeypatch.setattr(deploy.subprocess, "run", no_subprocess)
    ecr = aws["ecr"]
    config = EcrConfig(build="manifest")
    result = publish_image(
        ecr, config, model_name="network_security", model_version="3", labels={"mlflow.run-id": "abc123"}
    )

    assert result["how"] == "manifest"
    assert result["tag"] == "network-security-v3"
    assert result["repository"] == config.repository
    repository_uri = describe_repository(ecr, config.repository)["repositoryUri"]
    assert result["image_uri"] == f"{repository_uri}:network-security-v3"

    details = ecr.describe_images(repositoryName=config.repository, imageIds=[{"imageTag": "network-security-v3"}])
    (image,) = details["imageDetails"]
    assert image["imageTags"] == ["network-security-v3"]
    assert image["imageDigest"] == result["digest"]
    assert result["digest"].startswith("sha256:")

    manifest = stored_manifest(ecr, config.repository, "network-security-v3")
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["layers"] == []
    annotations = manifest["annotations"]
    assert annotations["network-security.model-name"] == "network_security"
    assert annotations["network-security.model-version"] == "3"
    assert annotations["network-security.source-digest"] == source_digest()
    assert annotations["org.opencontainers.image.version"] == "network-security-v3"
    assert annotations["mlflow.run-id"] == "abc123"


def test_publish_image_manifest_config_digest_matches_the_labels():
    labels = {"network-security.model-version": "3", "a": "b"}
    manifest = json.loads(deploy.image_manifest(labels))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": labels}}, sort_keys=True)
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config.encode()).hexdigest()
    assert manifest["config"]["size"] == len(config.encode())
    assert manifest["config"]["mediaType"] == deploy.OCI_CONFIG


def test_publish_image_twice_finds_the_existing_immutable_tag(aws):
    ecr = aws["ecr"]
    config = EcrConfig(build="manifest")
    first = publish_image(ecr, config, model_name="network_security", model_version="3")
    second = publish_image(ecr, config, model_name="network_security", model_version="3")
    assert first["how"] == "manifest"
    assert second["how"] == "existing"
    assert second["digest"] == first["digest"]
    assert second["image_uri"] == first["image_uri"]
    images = ecr.describe_images(repositoryName=config.repository)["imageDetails"]
    assert [i["imageTags"] for i in images] == [["network-security-v3"]]


def test_publish_image_keeps_one_tag_per_model_version(aws):
    ecr = aws["ecr"]
    config = EcrConfig(build="manifest")
    publish_image(ecr, config, model_name="network_security", model_version="3")
    publish_image(ecr, config, model_name="network_security", model_version="4")
    images = ecr.describe_images(repositoryName=config.repository)["imageDetails"]
    assert sorted(tag for i in images for tag in i["imageTags"]) == ["network-security-v3", "network-security-v4"]
    v4 = stored_manifest(ecr, config.repository, "network-security-v4")
    assert v4["annotations"]["network-security.model-version"] == "4"


def test_publish_image_auto_without_engine_records_the_manifest(aws, monkeypatch):
    probes = []
    monkeypatch.setattr(deploy, "docker_engine_available", lambda *a, **k: probes.append(1) or False)
    ecr = aws["ecr"]
    result = publish_image(ecr, EcrConfig(build="auto"), model_name="network_security", model_version="5")
    assert probes == [1]
    assert result["how"] == "manifest"
    manifest = stored_manifest(ecr, "network-security-serving", "network-security-v5")
    assert manifest["annotations"]["network-security.model-version"] == "5"


class FakeRun:
    """Stands in for ``subprocess.run``: records each call, fails the command named in ``fail``."""

    def __init__(self, fail: str | None = None, stderr: str = "") -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.stderr = stderr

    def __call__(self, command, **kwargs):
        self.calls.append({"command": list(command), **kwargs})
        failed = self.fail is not None and command[:2] == ["docker", self.fail]
        return subprocess.CompletedProcess(command, 1 if failed else 0, stdout="", stderr=self.stderr if failed else "")


def test_publish_image_with_docker_logs_in_builds_and_pushes_in_order(aws, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(deploy.subprocess, "run", fake)
    logins = []

    def login():
        logins.append(1)
        return ("AWS", "s3cr3t-token")

    ecr = aws["ecr"]
    result = publish_image(
        ecr,
        EcrConfig(build="docker"),
        model_name="network_security",
        model_version="7",
        labels={"git.sha": "deadbeef"},
        registry_login=login,
    )

    assert result["how"] == "docker"
    assert logins == [1]
    image_uri = result["image_uri"]
    registry = image_uri.split("/", 1)[0]
    assert registry.endswith(f".dkr.ecr.{REGION}.amazonaws.com")
    assert [call["command"][:2] for call in fake.calls] == [
        ["docker", "login"],
        ["docker", "build"],
        ["docker", "push"],
    ]
    login_call, build_call, push_call = fake.calls

    assert login_call["command"] == ["docker", "login", "--username", "AWS", "--password-stdin", registry]
    assert login_call["input"] == "s3cr3t-token"
    assert "s3cr3t-token" not in " ".join(login_call["command"])

    build = build_call["command"]
    assert build[2:6] == ["-f", "serving/Dockerfile", "-t", image_uri]
    assert build[-1] == "."
    assert build_call["cwd"] == PROJECT_ROOT
    label_args = build[6:-1]
    assert label_args[0::2] == ["--label"] * (len(label_args) // 2)
    labels = dict(arg.split("=", 1) for arg in label_args[1::2])
    assert labels["network-security.model-name"] == "network_security"
    assert labels["network-security.model-version"] == "7"
    assert labels["network-security.source-digest"] == source_digest()
    assert labels["git.sha"] == "deadbeef"

    assert push_call["command"] == ["docker", "push", image_uri]
    # Nothing was really pushed: no manifest was recorded in its place.
    assert ecr.describe_images(repositoryName="network-security-serving")["imageDetails"] == []


def test_publish_image_with_docker_and_no_login_skips_docker_login(aws, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(deploy.subprocess, "run", fake)
    publish_image(aws["ecr"], EcrConfig(build="docker"), model_name="m", model_version="1")
    assert [call["command"][1] for call in fake.calls] == ["build", "push"]


def test_publish_image_auto_with_engine_builds(aws, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(deploy.subprocess, "run", fake)
    monkeypatch.setattr(deploy, "docker_engine_available", lambda *a, **k: True)
    result = publish_image(aws["ecr"], EcrConfig(build="auto"), model_name="m", model_version="1")
    assert result["how"] == "docker"
    assert [call["command"][1] for call in fake.calls] == ["build", "push"]


@pytest.mark.parametrize("failing", ["login", "build", "push"])
def test_publish_image_docker_failure_raises_with_stderr(aws, monkeypatch, failing):
    fake = FakeRun(fail=failing, stderr="denied: no space left on device\n")
    monkeypatch.setattr(deploy.subprocess, "run", fake)
    with pytest.raises(DeployFailed) as raised:
        publish_image(
            aws["ecr"],
            EcrConfig(build="docker"),
            model_name="m",
            model_version="1",
            registry_login=lambda: ("AWS", "pw"),
        )
    message = str(raised.value)
    assert "denied: no space left on device" in message
    assert f"docker {failing}" in message
    assert "m-v1" in message
    # The steps after the failing one never ran.
    steps = ["login", "build", "push"]
    assert [call["command"][1] for call in fake.calls] == steps[: steps.index(failing) + 1]


def test_docker_engine_available(monkeypatch):
    def answering(code):
        return lambda command, **kw: subprocess.CompletedProcess(command, code)

    def missing(command, **kw):
        raise FileNotFoundError("docker")

    def hanging(command, **kw):
        raise subprocess.TimeoutExpired(command, kw.get("timeout", 0))

    monkeypatch.setattr(deploy.subprocess, "run", answering(0))
    assert deploy.docker_engine_available() is True
    monkeypatch.setattr(deploy.subprocess, "run", answering(1))
    assert deploy.docker_engine_available() is False
    monkeypatch.setattr(deploy.subprocess, "run", missing)
    assert deploy.docker_engine_available() is False
    monkeypatch.setattr(deploy.subprocess, "run", hanging)
    assert deploy.docker_engine_available() is False


# --- source_digest ----------------------------------------------------------------------


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "app.py").write_text("print('serving')\n")
    (tmp_path / "serving" / "sub").mkdir()
    (tmp_path / "serving" / "sub" / "util.py").write_text("X = 1\n")
    (tmp_path / "constraints.txt").write_text("httpx==0.28.1\n")
    (tmp_path / "unrelated.txt").write_text("not an image source\n")
    return tmp_path


SOURCES = ("serving", "constraints.txt")


def test_source_digest_is_stable(source_tree):
    first = source_digest(source_tree, SOURCES)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert source_digest(source_tree, SOURCES) == first


def test_source_digest_of_the_project_is_stable():
    assert source_digest() == source_digest()


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "serving" / "sub" / "util.py").write_text("X = 2\n"),
        lambda root: (root / "constraints.txt").write_text("httpx==0.28.2\n"),
        lambda root: (root / "serving" / "new.py").write_text(""),
        lambda root: (root / "serving" / "sub" / "util.py").rename(root / "serving" / "sub" / "helpers.py"),
        lambda root: (root / "serving" / "app.py").unlink(),
    ],
    ids=["content", "single-file-source", "new-file", "rename", "deletion"],
)
def test_source_digest_changes_with_the_sources(source_tree, change):
    before = source_digest(source_tree, SOURCES)
    change(source_tree)
    assert source_digest(source_tree, SOURCES) != before


def test_source_digest_ignores_files_outside_the_sources_and_bytecode(source_tree):
    before = source_digest(source_tree, SOURCES)
    (source_tree / "unrelated.txt").write_text("changed\n")
    cache = source_tree / "serving" / "__pycache__"
    cache.mkdir()
    (cache / "app.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (cache / "notes.txt").write_text("anything inside __pycache__")
    (source_tree / "serving" / "sub" / "stray.pyc").write_bytes(b"\x01")
    assert source_digest(source_tree, SOURCES) == before


# --- EC2 and SSM ------------------------------------------------------------------------


FLEET = Ec2Config(tags={"Name": "ns-serving", "Project": "ns", "Role": "model-server"}, instance_type="t3.micro")
SCRIPT = "#!/bin/bash\necho 'serving host'\n"


def live_instances(ec2: Any) -> list[dict[str, Any]]:
    filters = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]


def test_ensure_instances_launches_one_tagged_instance(aws):
    ec2, ssm = aws["ec2"], aws["ssm"]
    result = ensure_instances(ec2, ssm, FLEET, SCRIPT)

    (instance_id,) = result["instance_ids"]
    assert result["launched"] == [instance_id]
    (instance,) = live_instances(ec2)
    assert instance["InstanceId"] == instance_id
    assert instance["State"]["Name"] == "running"
    assert instance["InstanceType"] == "t3.micro"
    assert instance["ImageId"] == ssm.get_parameter(Name=AMI_PARAMETER)["Parameter"]["Value"]
    assert {t["Key"]: t["Value"] for t in instance["Tags"]} == FLEET.tags
    assert instance["MetadataOptions"]["HttpTokens"] == "required"

    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
    assert volumes
    for volume in volumes:
        assert {t["Key"]: t["Value"] for t in volume["Tags"]} == FLEET.tags

    attribute = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    assert base64.b64decode(attribute["UserData"]["Value"]).decode() == SCRIPT


def test_ensure_instances_uses_the_configured_ami_parameter(aws):
    ec2, ssm = aws["ec2"], aws["ssm"]
    ssm.put_parameter(Name="/custom/ami", Value="ami-0123456789abcdef0", Type="String")
    config = Ec2Config(tags=FLEET.tags, ami_parameter="/custom/ami")
    (instance_id,) = ensure_instances(ec2, ssm, config, SCRIPT)["launched"]
    (instance,) = live_instances(ec2)
    assert instance["InstanceId"] == instance_id
    assert instance["ImageId"] == "ami-0123456789abcdef0"


def test_ensure_instances_reuses_the_running_fleet(aws):
    ec2, ssm = aws["ec2"], aws["ssm"]
    first = ensure_instances(ec2, ssm, FLEET, SCRIPT)
    second = ensure_instances(ec2, ssm, FLEET, SCRIPT)
    assert second == {"instance_ids": first["instance_ids"], "launched": []}
    assert len(live_instances(ec2)) == 1


def test_ensure_instances_ignores_terminated_instances(aws):
    ec2, ssm = aws["ec2"], aws["ssm"]
    (old,) = ensure_instances(ec2, ssm, FLEET, SCRIPT)["instance_ids"]
    ec2.terminate_instances(InstanceIds=[old])
    result = ensure_instances(ec2, ssm, FLEET, SCRIPT)
    (new,) = result["launched"]
    assert new != old
    assert result["instance_ids"] == [new]
    assert [i["InstanceId"] for i in live_instances(ec2)] == [new]


def test_ensure_instances_requires_every_tag(aws):
    ec2, ssm = aws["ec2"], aws["ssm"]
    ami = ssm.get_parameter(Name=AMI_PARAMETER)["Parameter"]["Value"]
    partial = [{"Key": "Name", "Value": "ns-serving"}, {"Key": "Project", "Value": "ns"}]
    wrong_value = [*partial, {"Key": "Role", "Value": "batch"}]
    for tags in (partial, wrong_value):
        ec2.run_instances(
            ImageId=ami,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
    others = {i["InstanceId"] for i in live_instances(ec2)}

    result = ensure_instances(ec2, ssm, FLEET, SCRIPT)
    (launched,) = result["launched"]
    assert launched not in others
    assert result["instance_ids"] == [launched]
    # And the partially tagged ones are still not counted on the next call.
    assert ensure_instances(ec2, ssm, FLEET, SCRIPT) == {"instance_ids": [launched], "launched": []}


def test_ensure_instances_passes_the_instance_profile(aws, monkeypatch):
    ec2, ssm = aws["ec2"], aws["ssm"]
    requests = []
    real_run = ec2.run_instances

    def spy(**request):
        requests.append(request)
        return real_run(**{k: v for k, v in request.items() if k != "IamInstanceProfile"})

    monkeypatch.setattr(ec2, "run_instances", spy)
    config = Ec2Config(tags=FLEET.tags, instance_profile="ns-serving-host")
    ensure_instances(ec2, ssm, config, SCRIPT)
    assert requests[0]["IamInstanceProfile"] == {"Name": "ns-serving-host"}
    requests.clear()
    ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in live_instances(ec2)])
    ensure_instances(ec2, ssm, FLEET, SCRIPT)
    assert "IamInstanceProfile" not in requests[0]


# --- user_data and rollout_commands -------------------------------------------------------


def test_user_data_is_a_valid_bash_script_with_the_serving_environment(tmp_path):
    config = Ec2Config(slot_ports=(9101, 9102), api_key_parameter="/ns/key")
    script = user_data(
        config,
        region="eu-west-3",
        tracking_uri="http://mlflow.internal:5000",
        environment={"MODEL_NAME": "network_security", "MODEL_ALIAS": "champion"},
    )
    assert script.startswith("#!/bin/bash\n")
    lines = script.splitlines()
    for line in (
        "MLFLOW_TRACKING_URI=http://mlflow.internal:5000",
        "AWS_DEFAULT_REGION=eu-west-3",
        "API_KEY_FILE=/run/secrets/api_key",
        "MODEL_NAME=network_security",
        "MODEL_ALIAS=champion",
    ):
        assert line in lines
    # The env lines sit inside the serving.env heredoc.
    start, end = lines.index("cat > /opt/ns-serving/serving.env <<'ENV'"), lines.index("ENV")
    assert start < lines.index("MODEL_NAME=network_security") < end
    assert "--name /ns/key" in script
    assert "--region eu-west-3" in script
    assert "echo 'server 127.0.0.1:9101;' > /etc/nginx/ns-upstream.conf" in lines
    assert "upstream ns_serving { include /etc/nginx/ns-upstream.conf; }" in lines
    checked = bash_syntax_ok(tmp_path, script)
    assert checked.returncode == 0, checked.stderr


def test_user_data_environment_overrides_the_defaults():
    script = user_data(
        Ec2Config(), region="us-east-1", tracking_uri="http://a", environment={"MLFLOW_TRACKING_URI": "http://b"}
    )
    assert "MLFLOW_TRACKING_URI=http://b" in script.splitlines()
    assert "MLFLOW_TRACKING_URI=http://a" not in script


def test_user_data_quotes_the_parameter_name(tmp_path):
    script = user_data(
        Ec2Config(api_key_parameter="/ns/key; rm -rf /"), region="us-east-1", tracking_uri="http://a", environment={}
    )
    assert "--name '/ns/key; rm -rf /'" in script
    assert bash_syntax_ok(tmp_path, script).returncode == 0


def assignments(commands: list[str]) -> dict[str, str]:
    """What the variable lines assign, as bash would see it."""
    values = {}
    for line in commands:
        if "\n" in line:  # the script's heredoc and the run line
            continue
        words = shlex.split(line)
        if len(words) == 1 and "=" in words[0]:
            key, value = words[0].split("=", 1)
            values[key] = value
    return values


def test_rollout_commands_deploy():
    commands = rollout_commands(
        image_uri="1.dkr.ecr.us-east-1.amazonaws.com/serving:m-v3",
        model_version="3",
        region="us-east-1",
        config=Ec2Config(slot_ports=(9101, 9102)),
    )
    assert commands[0] == "set -euo pipefail"
    assert assignments(commands) == {
        "IMAGE_URI": "1.dkr.ecr.us-east-1.amazonaws.com/serving:m-v3",
        "MODEL_VERSION": "3",
        "REGION": "us-east-1",
        "ACTION": "deploy",
        "ARG": "",
        "ROLLOUT": deploy.HOST_ROLLOUT,
    }
    script = "\n".join(commands)
    assert "NS_BLUE_PORT=9101 NS_GREEN_PORT=9102" in script
    assert f"127.0.0.1:$port:{deploy.CONTAINER_PORT}" in script
    assert 'deploy "$MODEL_VERSION" "$IMAGE_URI" && "$ROLLOUT" complete "$MODEL_VERSION"' in script


def test_rollout_commands_rollback():
    commands = rollout_commands(
        image_uri="img:tag", model_version="3", region="us-east-1", config=Ec2Config(), action="rollback"
    )
    assert assignments(commands)["ACTION"] == "rollback"


def test_rollout_commands_shell_quote_their_values(tmp_path):
    nasty = {
        "image_uri": "repo:tag with space",
        "model_version": "3'; touch /tmp/pwned; echo '",
        "region": 'us-"east"-1 $(id)',
    }
    commands = rollout_commands(**nasty, config=Ec2Config())
    values = assignments(commands)
    assert values["IMAGE_URI"] == nasty["image_uri"]
    assert values["MODEL_VERSION"] == nasty["model_version"]
    assert values["REGION"] == nasty["region"]
    # What bash itself assigns, not only what shlex reads back.
    probe = "\n".join(
        [*commands[1:4], 'printf "%s\\n" "$IMAGE_URI" "$MODEL_VERSION" "$REGION"'],
    )
    echoed = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert echoed.splitlines() == [nasty["image_uri"], nasty["model_version"], nasty["region"]]


@pytest.mark.parametrize("action", sorted(deploy.ROLLOUT_ACTIONS))
def test_rollout_script_passes_bash_syntax_check(tmp_path, action):
    commands = rollout_commands(
        image_uri="1.dkr.ecr.us-east-1.amazonaws.com/serving:m-v3 x",
        model_version="3",
        region="us-east-1",
        config=Ec2Config(),
        action=action,
    )
    checked = bash_syntax_ok(tmp_path, "\n".join(commands))
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("action", ["redeploy", "Deploy", ""])
def test_rollout_commands_reject_unknown_actions(action):
    with pytest.raises(ValueError, match="must be deploy or rollback"):
        rollout_commands(image_uri="i", model_version="1", region="r", config=Ec2Config(), action=action)


# --- smoke_test ---------------------------------------------------------------------------


# --- the smoke test, against the real serving app --------------------------------------------
#
# The app of ``serving.app.create_app`` serves a real registered pipeline under uvicorn; a
# test that needs a misbehaving server wraps it in ``Faults``, which changes one answer and
# passes everything else through to the app.

API_KEY = "smoke-test-key"


class Faults:
    """ASGI middleware around the serving app: each attribute breaks one behaviour, the rest is the app's."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.reset()

    def reset(self) -> None:
        self.ready_failures = 0  # /ready answers 503 this many times first
        self.status: dict[str, tuple[int, bytes]] = {}  # path -> (status, body) answered instead
        self.rewrite: dict[str, Callable[[Any], Any]] = {}  # path -> changes the app's JSON answer
        self.paths: list[str] = []

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        self.paths.append(path)
        if path == "/ready" and self.ready_failures:
            self.ready_failures -= 1
            return await self._answer(send, 503, b'{"status": "not ready"}')
        if path in self.status:
            return await self._answer(send, *self.status[path])
        if path not in self.rewrite:
            return await self.app(scope, receive, send)
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        changed = json.dumps(self.rewrite[path](json.loads(body))).encode()
        status = next(m["status"] for m in messages if m["type"] == "http.response.start")
        await self._answer(send, status, changed)

    @staticmethod
    async def _answer(send: Callable, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, network_spec: Any) -> Iterator[dict[str, Any]]:
    """The serving app on a real uvicorn server, serving v1 of a test registry (prediction log off)."""
    import socket
    import threading
    import time

    import uvicorn

    from serving.app import create_app
    from serving.config import ServingSettings
    from tests.model_registry import register_pipeline

    registry = register_pipeline(tmp_path_factory.mktemp("registry"), network_spec)
    settings = ServingSettings.from_env(
        {
            "MLFLOW_TRACKING_URI": registry.tracking_uri,
            "MODEL_NAME": registry.model_name,
            "API_KEY": API_KEY,
            "PREDICTION_LOG_BUCKET": "",
        }
    )
    # The app resolves models:/ URIs through MLflow's process-wide tracking URI (its own process has
    # MLFLOW_TRACKING_URI): point it at the test registry for this module, and back afterwards.
    import mlflow

    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    mlflow.set_tracking_uri(registry.tracking_uri)
    faults = Faults(create_app(settings))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(faults, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the serving app did not start"
        time.sleep(0.05)
    records = json.loads(registry.features.head(10).to_json(orient="records"))
    labels = registry.pipeline.predict(registry.features.head(10)).tolist()  # what v1 answers
    try:
        yield {
            "url": f"http://127.0.0.1:{port}", "faults": faults, "records": records, "labels": labels,
            "model_name": registry.model_name,
        }  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        patch.undo()
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))  # type: ignore[arg-type]


@pytest.fixture
def server(served: dict[str, Any]) -> Iterator[Faults]:
    """The served app with no fault injected (each test breaks what it needs)."""
    served["faults"].reset()
    yield served["faults"]
    served["faults"].reset()


def run_smoke(served: dict[str, Any], labels: list[Any] | None = None, **overrides: Any) -> dict[str, Any]:
    arguments = {"expected_version": "1", "min_accuracy": 0.8, "timeout": 5.0} | overrides
    return smoke_test(served["url"], API_KEY, served["records"], labels or served["labels"], **arguments)


def flipped(labels: list[int], count: int) -> list[int]:
    """``labels`` with the last ``count`` changed to the other class (-1 <-> 1)."""
    return labels[: len(labels) - count] + [-label for label in labels[len(labels) - count :]]


def test_smoke_test_passes_on_the_expected_champion(served, server):
    result = run_smoke(served)
    assert result == {
        "url": served["url"],
        "model_version": "1",
        "records": 10,
        "accuracy": 1.0,
        "seconds": result["seconds"],
    }
    assert 0 < result["seconds"] < 5
    assert server.paths[-4:] == ["/ready", "/model", "/predict", "/predict/batch"]


def test_smoke_test_of_one_model_on_a_server_of_several_uses_its_routes(served, server):
    name = served["model_name"]
    assert run_smoke(served, model_name=name)["accuracy"] == 1.0
    assert server.paths[-4:] == [
        "/ready",
        f"/models/{name}",
        f"/models/{name}/predict",
        f"/models/{name}/predict/batch",
    ]
    with pytest.raises(SmokeTestFailed, match="/models/another_model answered 404"):
        run_smoke(served, model_name="another_model")


def test_smoke_test_accuracy_exactly_at_the_minimum_passes(served, server):
    assert run_smoke(served, flipped(served["labels"], 2), min_accuracy=0.8)["accuracy"] == 0.8


def test_smoke_test_waits_for_ready(served, server):
    server.ready_failures = 2
    assert run_smoke(served)["accuracy"] == 1.0
    assert server.paths.count("/ready") == 3


def test_smoke_test_fails_when_model_reports_another_version(served, server):
    with pytest.raises(SmokeTestFailed) as raised:
        run_smoke(served, expected_version="6")
    message = str(raised.value)
    assert '"model_version":"1"' in message.replace(" ", "")
    assert "expected v6" in message
    assert f"{served['url']}/model" in message


def test_smoke_test_fails_when_model_answers_something_else_than_json(served, server):
    server.status["/model"] = (200, b"<html>gateway</html>")
    with pytest.raises(SmokeTestFailed, match="expected v1"):
        run_smoke(served)


def test_smoke_test_fails_when_predictions_come_from_another_version(served, server):
    server.rewrite["/predict/batch"] = lambda body: {
        **body, "predictions": [{**p, "model_version": "6"} for p in body["predictions"]]
    }  # fmt: skip
    with pytest.raises(SmokeTestFailed, match=r"version\(s\) \['1', '6'\], expected v1"):
        run_smoke(served)


def test_smoke_test_fails_on_batch_error_status(served, server):
    server.status["/predict/batch"] = (503, b"model is loading")
    with pytest.raises(SmokeTestFailed) as raised:
        run_smoke(served)
    message = str(raised.value)
    assert "/predict/batch answered 503" in message
    assert "model is loading" in message


def test_smoke_test_fails_below_minimum_accuracy(served, server):
    with pytest.raises(SmokeTestFailed) as raised:
        run_smoke(served, flipped(served["labels"], 3), min_accuracy=0.8)
    message = str(raised.value)
    assert "accuracy 0.700" in message
    assert "minimum 0.800" in message
    assert "10 smoke records" in message
    assert "v1" in message


def test_smoke_test_fails_when_never_ready(served, server):
    server.ready_failures = 10_000
    with pytest.raises(SmokeTestFailed, match=r"/ready did not answer 200 within"):
        run_smoke(served, timeout=0.2)
    assert set(server.paths) == {"/ready"}


def test_smoke_test_fails_when_single_and_batch_disagree(served, server):
    server.rewrite["/predict"] = lambda body: {**body, "label": -body["label"]}
    with pytest.raises(SmokeTestFailed, match="single and the batch prediction"):
        run_smoke(served)


def test_smoke_test_fails_cleanly_when_the_batch_misses_records(served, server):
    server.rewrite["/predict/batch"] = lambda body: {**body, "predictions": body["predictions"][:-1]}
    with pytest.raises(SmokeTestFailed, match="answered 9 predictions for 10 records"):
        run_smoke(served)


def test_smoke_test_sends_the_api_key(served, server):
    with pytest.raises(SmokeTestFailed, match=r"/model answered 40[13]"):
        smoke_test(served["url"], "wrong-key", served["records"], served["labels"], expected_version="1",
                   min_accuracy=0.8, timeout=5.0)  # fmt: skip


# --- the EC2 side of a release: awaited SSM commands, CloudWatch alarms (moto) -----------------


def launched_instance(aws) -> str:
    script = user_data(Ec2Config(), region=REGION, tracking_uri="http://m", environment={})
    return deploy.ensure_instances(aws["ec2"], aws["ssm"], Ec2Config(), script)["instance_ids"][0]


def test_send_and_wait_records_the_real_outcome_of_each_instance(aws):
    instance_id = launched_instance(aws)
    commands = rollout_commands(
        image_uri="i:1", model_version="1", region=REGION, config=Ec2Config(), action="weight", arg="10"
    )
    sent = deploy.send_and_wait(aws["ssm"], [instance_id], commands, "canary 10 %", poll=0)
    assert sent["ok"] is True and sent["instances"][instance_id]["status"] == "Success"

    class FailingSsm:
        """What SSM says of a rollback whose script exited 1 (moto reports every command as a success)."""

        exceptions = aws["ssm"].exceptions

        def send_command(self, **kwargs):
            return {"Command": {"CommandId": "c-1"}}

        def get_command_invocation(self, CommandId, InstanceId):  # noqa: N803 - boto3's names
            return {"Status": "Failed", "StandardOutputContent": "rollback failed: no slot serves v7"}

    failed = deploy.send_and_wait(FailingSsm(), ["i-1"], commands, "roll back", poll=0)
    assert failed["ok"] is False
    assert failed["instances"]["i-1"] == {
        "status": "Failed",
        "output": "rollback failed: no slot serves v7",
        "error": "",
    }


def test_release_alarms_are_created_once_and_an_alarm_in_alarm_aborts_the_canary(aws):
    from tasks.release import ABORT, alarm_verdict

    cloudwatch, config = aws["cloudwatch"], deploy.CloudWatchConfig()
    names = deploy.ensure_release_alarms(cloudwatch, config, model_name="m", version="2", max_5xx_rate=0.001)
    assert names == deploy.ensure_release_alarms(cloudwatch, config, model_name="m", version="2", max_5xx_rate=0.001)
    (alarm,) = cloudwatch.describe_alarms(AlarmNames=names)["MetricAlarms"]
    assert alarm["Threshold"] == 0.001 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm_verdict(deploy.alarm_states(cloudwatch, names)) is None  # no data: not breaching

    cloudwatch.set_alarm_state(AlarmName=names[0], StateValue="ALARM", StateReason="5xx rate 0.05 > 0.001")
    aborted = alarm_verdict(deploy.alarm_states(cloudwatch, names))
    assert aborted["status"] == ABORT and "5xx rate 0.05 > 0.001" in aborted["reasons"][0]
