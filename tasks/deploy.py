"""Delivery: the serving image in ECR, the EC2 fleet through SSM, the smoke test.

Pure functions over boto3 clients (the DAG builds them from the ``aws`` connection, so
the same code talks to the emulator or to AWS) and over HTTP. The local target (a real
uvicorn process of the serving app) lives in ``tasks.local_server``.

Embedded mode has no Docker engine: :func:`publish_image` then records the release's
image manifest in ECR (an OCI manifest whose config names the model version and the
digest of the serving sources) instead of building and pushing the image. Where an
engine answers, it builds ``serving/Dockerfile`` and pushes it with ECR credentials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.dataset_spec import PROJECT_ROOT

log = logging.getLogger(__name__)

DEPLOY_CONFIG = PROJECT_ROOT / "include" / "deploy.yaml"
# What the serving image is built from (serving/Dockerfile copies exactly these).
IMAGE_SOURCES = ("serving", "tasks", "include/datasets", "constraints.txt")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TARGETS = ("local", "ec2")
CONTAINER_PORT = 8000


# ecr, ec2, smoke, cloudwatch are read here; approval, shadow, canary by tasks.release.
SECTIONS = ("ecr", "ec2", "smoke", "models", "cloudwatch", "approval", "shadow", "canary")


class DeployFailed(RuntimeError):
    """A release could not be shipped or did not pass its checks; the message says where."""


class SmokeTestFailed(DeployFailed):
    """The freshly deployed model did not answer as the new champion should."""


@dataclass(frozen=True)
class EcrConfig:
    repository: str = "network-security-serving"
    scan_on_push: bool = True
    tag_mutability: str = "IMMUTABLE"
    build: str = "auto"

    def __post_init__(self) -> None:
        if self.build not in ("auto", "docker", "manifest"):
            raise ValueError(f"ecr.build must be auto, docker or manifest, got {self.build!r}")
        if self.tag_mutability not in ("IMMUTABLE", "MUTABLE"):
            raise ValueError(f"ecr.tag_mutability must be IMMUTABLE or MUTABLE, got {self.tag_mutability!r}")


@dataclass(frozen=True)
class Ec2Config:
    tags: dict[str, str] = field(default_factory=lambda: {"Name": "network-security-serving"})
    instance_type: str = "t3.small"
    ami_parameter: str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    instance_profile: str = ""
    slot_ports: tuple[int, int] = (8001, 8002)
    api_key_parameter: str = "/network-security/serving/api-key"
    admin_api_key_parameter: str = "/network-security/serving/admin-api-key"

    def __post_init__(self) -> None:
        if not self.tags:
            raise ValueError("ec2.tags must name the serving fleet (at least one tag)")
        if len(self.slot_ports) != 2 or len(set(self.slot_ports)) != 2:
            raise ValueError(f"ec2.slot_ports must be two different ports (blue, green), got {self.slot_ports}")


@dataclass(frozen=True)
class SmokeConfig:
    records: int = 64
    min_accuracy: float = 0.8
    timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.records < 1:
            raise ValueError("smoke.records must be at least 1")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"smoke.min_accuracy must be within [0, 1], got {self.min_accuracy}")


@dataclass(frozen=True)
class CloudWatchConfig:
    namespace: str = "NetworkSecurity/Serving"
    period_seconds: int = 60
    evaluation_periods: int = 1

    def __post_init__(self) -> None:
        if self.period_seconds < 10 or self.evaluation_periods < 1:
            raise ValueError("cloudwatch.period_seconds must be >= 10 and cloudwatch.evaluation_periods >= 1")


@dataclass(frozen=True)
class DeployConfig:
    """``include/deploy.yaml``. ``models``: per registered model, overrides of the ``ecr`` and ``ec2`` sections.

    The ECR repository and the fleet tags may hold ``{model}`` (the model's name as in an image
    tag: ``network_security`` → ``network-security``); :meth:`for_model` fills it in and applies
    the model's overrides, so every model has its own repository and fleet unless told otherwise.
    """

    ecr: EcrConfig = field(default_factory=EcrConfig)
    ec2: Ec2Config = field(default_factory=Ec2Config)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    cloudwatch: CloudWatchConfig = field(default_factory=CloudWatchConfig)
    models: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def for_model(self, model_name: str) -> DeployConfig:
        """The configuration one model ships with: its overrides applied, ``{model}`` filled in.

        Raises:
            ValueError: An override of an unknown key, or a value of the wrong type.
        """
        slug = model_slug(model_name)
        overrides = self.models.get(model_name, {})
        ecr = dataclasses.replace(self.ecr, **overrides.get("ecr", {}))
        ec2 = dataclasses.replace(self.ec2, **_ec2_values(overrides.get("ec2", {})))
        ecr = dataclasses.replace(ecr, repository=ecr.repository.replace("{model}", slug))
        tags = {key: value.replace("{model}", slug) for key, value in ec2.tags.items()}
        return dataclasses.replace(self, ecr=ecr, ec2=dataclasses.replace(ec2, tags=tags), models={})


def model_slug(model_name: str) -> str:
    """A model name as ECR repositories and image tags spell it (``network_security`` → ``network-security``)."""
    return model_name.replace("_", "-").lower()


def _ec2_values(ec2: dict[str, Any]) -> dict[str, Any]:
    ec2 = dict(ec2)
    if "slot_ports" in ec2:
        ec2["slot_ports"] = tuple(int(port) for port in ec2["slot_ports"])
    if "tags" in ec2:
        if not isinstance(ec2["tags"], dict) or not ec2["tags"]:
            raise ValueError(f"ec2.tags must be a non-empty mapping of tag names to values, got {ec2['tags']!r}")
        ec2["tags"] = {str(k): str(v) for k, v in ec2["tags"].items()}
    return ec2


def load_deploy_config(path: Path = DEPLOY_CONFIG) -> DeployConfig:
    """Read ``include/deploy.yaml``; a malformed section fails naming the file and the key."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with sections ecr, ec2, smoke; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    try:
        models = dict(raw.get("models") or {})
        for name, sections in models.items():
            extra = sorted(set(sections or {}) - {"ecr", "ec2"})
            if not isinstance(sections, dict) or extra:
                raise ValueError(f"models.{name} overrides the ecr and ec2 sections only, got {sections!r}")
        config = DeployConfig(
            ecr=EcrConfig(**(raw.get("ecr") or {})),
            ec2=Ec2Config(**_ec2_values(raw.get("ec2") or {})),
            smoke=SmokeConfig(**(raw.get("smoke") or {})),
            models={name: dict(sections) for name, sections in models.items()},
            cloudwatch=CloudWatchConfig(**(raw.get("cloudwatch") or {})),
        )
        for name in models:
            config.for_model(name)  # a bad override fails here, naming the file, not at some deploy
        return config
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: {err}") from err


def parse_targets(value: str) -> tuple[str, ...]:
    """``"local,ec2"`` → ``("local", "ec2")``; unknown names fail with the known ones."""
    targets = tuple(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown deploy target(s) {unknown} in deploy_targets={value!r}; known: {list(TARGETS)}")
    return targets


def release_tag(model_name: str, version: str) -> str:
    """The image tag of a release: ``<model>-v<version>`` (immutable: one tag, one model version)."""
    return f"{model_slug(model_name)}-v{version}"


# --- ECR ------------------------------------------------------------------------------


def ensure_repository(ecr: Any, config: EcrConfig) -> dict[str, Any]:
    """Create the repository (scan on push, tag mutability as configured) or align an existing one."""
    if "{" in config.repository:
        raise ValueError(f"ECR repository {config.repository!r} is a template: use DeployConfig.for_model(model_name)")
    try:
        repository = ecr.create_repository(
            repositoryName=config.repository,
            imageTagMutability=config.tag_mutability,
            imageScanningConfiguration={"scanOnPush": config.scan_on_push},
        )["repository"]
        log.info("created ECR repository %s", repository["repositoryUri"])
        return repository
    except ecr.exceptions.RepositoryAlreadyExistsException:
        pass
    repository = ecr.describe_repositories(repositoryNames=[config.repository])["repositories"][0]
    if repository.get("imageTagMutability") != config.tag_mutability:
        ecr.put_image_tag_mutability(repositoryName=config.repository, imageTagMutability=config.tag_mutability)
    if repository.get("imageScanningConfiguration", {}).get("scanOnPush") != config.scan_on_push:
        ecr.put_image_scanning_configuration(
            repositoryName=config.repository, imageScanningConfiguration={"scanOnPush": config.scan_on_push}
        )
    return {
        **repository,
        "imageTagMutability": config.tag_mutability,
        "imageScanningConfiguration": {"scanOnPush": config.scan_on_push},
    }


def source_digest(root: Path = PROJECT_ROOT, sources: tuple[str, ...] = IMAGE_SOURCES) -> str:
    """sha256 over the files the serving image is built from (paths and contents, sorted)."""
    digest = hashlib.sha256()
    for source in sources:
        path = root / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


def image_manifest(labels: dict[str, str]) -> str:
    """An OCI image manifest (no layers) whose config carries the release's labels."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": labels}}, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [],
        "annotations": labels,
    }
    return json.dumps(manifest, sort_keys=True)


def find_image(ecr: Any, repository: str, tag: str) -> dict[str, Any] | None:
    try:
        details = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])["imageDetails"]
    except ecr.exceptions.ImageNotFoundException:
        return None
    return details[0] if details else None


def docker_engine_available(timeout: float = 10.0) -> bool:
    """True when ``docker info`` reaches an engine (a client alone is not enough)."""
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def publish_image(
    ecr: Any,
    config: EcrConfig,
    *,
    model_name: str,
    model_version: str,
    labels: dict[str, str] | None = None,
    registry_login: Callable[[], tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Make sure the serving image of this release is in ECR, tagged with the model version.

    Args:
        ecr: boto3 ECR client.
        config: Repository settings and how to build (auto, docker, manifest).
        model_name: Registered model name.
        model_version: Version being released (the tag is :func:`release_tag`).
        labels: Extra image labels (e.g. the MLflow run id, the git SHA).
        registry_login: Returns ``(username, password)`` for ``docker login`` (from
            ``EcrHook``); called only when the image is built.

    Returns:
        ``image_uri``, ``tag``, ``digest``, ``repository``, ``how`` (docker, manifest or existing).

    Raises:
        DeployFailed: The build or push failed (the message carries the tool's output).
    """
    repository = ensure_repository(ecr, config)
    tag = release_tag(model_name, model_version)
    image_uri = f"{repository['repositoryUri']}:{tag}"
    existing = find_image(ecr, config.repository, tag)
    result = {"image_uri": image_uri, "tag": tag, "repository": config.repository}
    if existing is not None:
        # Tags are immutable: the release's image is already there (a retried or repeated deploy).
        log.info("image %s already in ECR (%s)", image_uri, existing["imageDigest"])
        return {**result, "digest": existing["imageDigest"], "how": "existing"}
    all_labels = {
        "org.opencontainers.image.title": "network-security-serving",
        "org.opencontainers.image.version": tag,
        "network-security.model-name": model_name,
        "network-security.model-version": model_version,
        "network-security.source-digest": source_digest(),
        **(labels or {}),
    }
    use_docker = config.build == "docker" or (config.build == "auto" and docker_engine_available())
    if use_docker:
        _docker_build_and_push(image_uri, all_labels, registry_login() if registry_login else None)
        digest = (find_image(ecr, config.repository, tag) or {}).get("imageDigest", "")
        return {**result, "digest": digest, "how": "docker"}
    log.warning("no Docker engine: recording the image manifest of %s in ECR instead of building it", image_uri)
    image = ecr.put_image(
        repositoryName=config.repository,
        imageManifest=image_manifest(all_labels),
        imageManifestMediaType=OCI_MANIFEST,
        imageTag=tag,
    )["image"]
    return {**result, "digest": image["imageId"]["imageDigest"], "how": "manifest"}


def _docker_build_and_push(image_uri: str, labels: dict[str, str], login: tuple[str, str] | None) -> None:
    registry = image_uri.split("/", 1)[0]
    label_args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    steps: list[tuple[list[str], str | None]] = []
    if login is not None:
        steps.append((["docker", "login", "--username", login[0], "--password-stdin", registry], login[1]))
    steps += [
        (["docker", "build", "-f", "serving/Dockerfile", "-t", image_uri, *label_args, "."], None),
        (["docker", "push", image_uri], None),
    ]
    for command, stdin in steps:
        done = subprocess.run(command, cwd=PROJECT_ROOT, input=stdin, capture_output=True, text=True)
        if done.returncode != 0:
            shown = " ".join(command[:2])
            raise DeployFailed(f"`{shown}` failed for {image_uri}: {done.stderr.strip()[-2000:]}")


# --- EC2 and SSM ------------------------------------------------------------------------


def tag_filters(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()]


def find_instances(ec2: Any, tags: dict[str, str]) -> list[str]:
    """Ids of the pending or running instances carrying all ``tags``."""
    filters = [*tag_filters(tags), {"Name": "instance-state-name", "Values": ["pending", "running"]}]
    reservations = ec2.describe_instances(Filters=filters)["Reservations"]
    return sorted(instance["InstanceId"] for r in reservations for instance in r["Instances"])


def user_data(
    config: Ec2Config,
    *,
    region: str,
    tracking_uri: str,
    environment: dict[str, str],
    cloudwatch: CloudWatchConfig | None = None,
) -> str:
    """cloud-init script of a serving host: Docker, nginx in front of two slots, the serving env.

    The rollout itself is not baked in here: every release sends :func:`rollout_commands`
    through SSM, so a host launched long ago still runs the current procedure.
    """
    blue, green = config.slot_ports
    namespace = CloudWatchConfig().namespace if cloudwatch is None else cloudwatch.namespace
    env_lines = "\n".join(
        f"{key}={value}"
        for key, value in {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "AWS_DEFAULT_REGION": region,
            "API_KEY_FILE": "/run/secrets/api_key",
            "ADMIN_API_KEY_FILE": "/run/secrets/admin_api_key",
            **environment,
        }.items()
    )
    return f"""#!/bin/bash
# network-security serving host (written by tasks/deploy.py:user_data)
set -euo pipefail
dnf install -y docker nginx
systemctl enable --now docker
mkdir -p /opt/ns-serving
cat > /opt/ns-serving/serving.env <<'ENV'
{env_lines}
ENV
aws ssm get-parameter --region {shlex.quote(region)} --with-decryption \\
    --name {shlex.quote(config.api_key_parameter)} --query Parameter.Value --output text > /opt/ns-serving/api_key
aws ssm get-parameter --region {shlex.quote(region)} --with-decryption \\
    --name {shlex.quote(config.admin_api_key_parameter)} --query Parameter.Value --output text > /opt/ns-serving/admin_api_key
chmod 600 /opt/ns-serving/api_key /opt/ns-serving/admin_api_key
echo 'server 127.0.0.1:{blue};' > /etc/nginx/ns-upstream.conf
echo 'server 127.0.0.1:{blue};' > /etc/nginx/ns-idle.conf
: > /etc/nginx/ns-mirror.conf
# ns-upstream: the weighted slots of a canary; ns-mirror: `mirror /ns_mirror;` during a shadow
# (rollout.sh writes both; the idle slot's answers to mirrored requests are discarded by nginx).
cat > /etc/nginx/conf.d/ns-serving.conf <<'NGINX'
upstream ns_serving {{ include /etc/nginx/ns-upstream.conf; }}
upstream ns_idle {{ include /etc/nginx/ns-idle.conf; }}
server {{
  listen 80;
  location / {{ include /etc/nginx/ns-mirror.conf; proxy_pass http://ns_serving; }}
  location = /ns_mirror {{ internal; proxy_pass http://ns_idle$request_uri; }}
}}
NGINX
systemctl enable --now nginx
# The serving app's per-version Prometheus metrics (both slots) to CloudWatch, where the release's
# alarms watch the candidate version (tasks/deploy.py:ensure_release_alarms).
dnf install -y amazon-cloudwatch-agent
cat > /opt/ns-serving/prometheus.yaml <<'PROM'
global: {{scrape_interval: 15s}}
scrape_configs:
  - job_name: ns-serving
    static_configs: [{{targets: ["127.0.0.1:{blue}", "127.0.0.1:{green}"]}}]
PROM
cat > /opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json <<'CWA'
{{"logs": {{"metrics_collected": {{"prometheus": {{"prometheus_config_path": "/opt/ns-serving/prometheus.yaml",
  "emf_processor": {{"metric_namespace": "{namespace}", "metric_declaration": [{{"source_labels": ["job"],
  "label_matcher": "ns-serving", "dimensions": [["model_name", "model_version", "role", "status"],
    ["model_name", "model_version", "role"]],
  "metric_selectors": ["^model_requests_total$", "^model_request_duration_seconds.*"]}}]}}}}}}}}}}
CWA
systemctl enable --now amazon-cloudwatch-agent
"""


def ensure_instances(ec2: Any, ssm: Any, config: Ec2Config, script: str) -> dict[str, Any]:
    """The serving fleet's instance ids; launch one (with ``script`` as user-data) if none runs."""
    existing = find_instances(ec2, config.tags)
    if existing:
        return {"instance_ids": existing, "launched": []}
    ami = ssm.get_parameter(Name=config.ami_parameter)["Parameter"]["Value"]
    tags = [{"Key": key, "Value": value} for key, value in config.tags.items()]
    request: dict[str, Any] = {
        "ImageId": ami,
        "InstanceType": config.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": script,
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
        "MetadataOptions": {"HttpTokens": "required"},
    }
    if config.instance_profile:
        request["IamInstanceProfile"] = {"Name": config.instance_profile}
    launched = [i["InstanceId"] for i in ec2.run_instances(**request)["Instances"]]
    ec2.get_waiter("instance_running").wait(InstanceIds=launched, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
    log.info("launched serving instance(s) %s from %s", launched, ami)
    return {"instance_ids": launched, "launched": launched}


ROLLOUT_SCRIPT = PROJECT_ROOT / "include" / "serving_host" / "rollout.sh"
HOST_ROLLOUT = "/opt/ns-serving/rollout.sh"
# action -> what the host script runs ("deploy" is the deploy DAG's blue/green switch).
ROLLOUT_ACTIONS = {
    "deploy": 'deploy "$MODEL_VERSION" "$IMAGE_URI" && "$ROLLOUT" complete "$MODEL_VERSION"',
    "stage": 'deploy "$MODEL_VERSION" "$IMAGE_URI"',
    "weight": 'weight "$ARG"',
    "mirror": 'mirror "$ARG"',
    "complete": 'complete "$MODEL_VERSION"',
    "rollback": 'rollback "$MODEL_VERSION" "$IMAGE_URI"',
}


def rollout_commands(
    *, image_uri: str, model_version: str, region: str, config: Ec2Config, action: str = "deploy", arg: str = ""
) -> list[str]:
    """Shell commands (AWS-RunShellScript) running ``include/serving_host/rollout.sh`` on a serving host.

    The script travels with every command (a host launched long ago runs the current procedure);
    it is idempotent and serialised with ``flock``. ``deploy``: the version into the idle slot,
    smoke-tested there, then switched live (the old slot kept for rollback); ``stage``: into the
    idle slot only (a release: no traffic yet); ``weight`` (``arg`` percent to the idle slot),
    ``mirror`` (``arg`` on|off), ``complete``; ``rollback``: nginx to the slot that reports
    ``model_version`` on ``/model``, else ``image_uri`` pulled into the idle slot, else a failure.
    """
    if action not in ROLLOUT_ACTIONS:
        raise ValueError(f"action must be deploy or rollback (or {', '.join(ROLLOUT_ACTIONS)}), got {action!r}")
    blue, green = config.slot_ports
    variables = [
        f"IMAGE_URI={shlex.quote(image_uri)}",
        f"MODEL_VERSION={shlex.quote(model_version)}",
        f"REGION={shlex.quote(region)}",
        f"ACTION={action}",
        f"ARG={shlex.quote(arg)}",
        f"ROLLOUT={HOST_ROLLOUT}",
    ]
    script = ROLLOUT_SCRIPT.read_text()
    install = f"mkdir -p /opt/ns-serving && cat > \"$ROLLOUT\" <<'NS_ROLLOUT_EOF'\n{script}NS_ROLLOUT_EOF"
    run = f'export REGION NS_BLUE_PORT={blue} NS_GREEN_PORT={green}\n"$ROLLOUT" {ROLLOUT_ACTIONS[action]}'
    return ["set -euo pipefail", *variables, install, 'chmod 755 "$ROLLOUT"', run]


RUN_SHELL_SCRIPT = "AWS-RunShellScript"


def send_commands(ssm: Any, instance_ids: list[str], commands: list[str], comment: str) -> str:
    """Run shell ``commands`` on the instances through SSM Run Command; return the command id.

    The deploy's own rollout waits on it with the provider's ``SsmRunCommandOperator``; a rollback
    sends and does not wait (nginx switches back in a second, and the run has failed anyway).
    """
    sent = ssm.send_command(
        InstanceIds=list(instance_ids),
        DocumentName=RUN_SHELL_SCRIPT,
        Parameters={"commands": commands},
        Comment=comment[:100],  # SSM's limit
    )
    return sent["Command"]["CommandId"]


def send_and_wait(
    ssm: Any, instance_ids: list[str], commands: list[str], comment: str, *, timeout: float = 600.0, poll: float = 2.0
) -> dict[str, Any]:
    """Send ``commands`` and wait for every instance's real outcome (never assumed).

    Returns:
        ``command_id``, ``ok`` (every instance reported Success) and per instance its status and output.
    """
    command_id = send_commands(ssm, instance_ids, commands, comment)
    deadline = time.monotonic() + timeout
    outcomes: dict[str, dict[str, str]] = {}
    pending = list(instance_ids)
    while pending:
        for instance_id in list(pending):
            try:
                invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
            except ssm.exceptions.InvocationDoesNotExist:
                continue
            status = invocation.get("Status", "Pending")
            if status not in ("Pending", "InProgress", "Delayed"):
                outcomes[instance_id] = {
                    "status": status,
                    "output": (invocation.get("StandardOutputContent") or "")[-2000:],
                    "error": (invocation.get("StandardErrorContent") or "")[-2000:],
                }
                pending.remove(instance_id)
        if pending:
            if time.monotonic() > deadline:
                for instance_id in pending:
                    outcomes[instance_id] = {"status": "TimedOut", "output": "", "error": f"no result in {timeout} s"}
                break
            time.sleep(poll)
    ok = all(outcome["status"] == "Success" for outcome in outcomes.values())
    return {"command_id": command_id, "ok": ok, "instances": outcomes}


# --- CloudWatch alarms of a release ------------------------------------------------------------


def release_alarm_names(model_name: str, version: str) -> list[str]:
    return [f"{model_name}-v{version}-canary-5xx-rate"]


def ensure_release_alarms(
    cloudwatch: Any, config: CloudWatchConfig, *, model_name: str, version: str, max_5xx_rate: float
) -> list[str]:
    """The candidate's alarms (idempotent: put_metric_alarm replaces an alarm of the same name).

    5xx rate of the canary role = 5xx answers / all answers of that version (metric math over the
    metrics the hosts' CloudWatch agent publishes from the serving app's Prometheus endpoint).
    """
    (name,) = release_alarm_names(model_name, version)
    dimensions = [
        {"Name": "model_name", "Value": model_name},
        {"Name": "model_version", "Value": version},
        {"Name": "role", "Value": "canary"},
    ]

    def stat(metric_id: str, extra: list[dict[str, str]]) -> dict[str, Any]:
        metric = {"Namespace": config.namespace, "MetricName": "model_requests_total", "Dimensions": dimensions + extra}
        return {
            "Id": metric_id,
            "MetricStat": {"Metric": metric, "Period": config.period_seconds, "Stat": "Sum"},
            "ReturnData": False,
        }

    cloudwatch.put_metric_alarm(
        AlarmName=name,
        AlarmDescription=f"{model_name} v{version}: canary 5xx rate above {max_5xx_rate} aborts the release",
        Metrics=[
            stat("errors", [{"Name": "status", "Value": "500"}]),
            stat("requests", []),
            {"Id": "rate", "Expression": "errors / requests", "Label": "5xx rate", "ReturnData": True},
        ],
        ComparisonOperator="GreaterThanThreshold",
        Threshold=max_5xx_rate,
        EvaluationPeriods=config.evaluation_periods,
        TreatMissingData="notBreaching",
    )
    return [name]


def alarm_states(cloudwatch: Any, names: list[str]) -> list[dict[str, Any]]:
    """Name, state and reason of each alarm (an alarm that was deleted is simply absent)."""
    if not names:
        return []
    alarms = cloudwatch.describe_alarms(AlarmNames=names)["MetricAlarms"]
    return [{k: a.get(k) for k in ("AlarmName", "StateValue", "StateReason")} for a in alarms]


# --- smoke test ---------------------------------------------------------------------


def smoke_test(
    base_url: str,
    api_key: str,
    records: list[dict[str, Any]],
    labels: list[Any],
    *,
    expected_version: str,
    min_accuracy: float,
    timeout: float = 60.0,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Send labelled records to a freshly deployed server and check it is the new champion.

    Checks: ``/ready`` answers within ``timeout``; ``/model`` and every prediction report
    ``expected_version``; single and batch predictions agree; accuracy on the sample is
    at least ``min_accuracy``. With ``model_name``, that model's own routes
    (``/models/{name}``, ``/models/{name}/predict``, ``.../predict/batch``) on a server of several.

    Returns:
        What was measured (records, accuracy, served version, latency).

    Raises:
        SmokeTestFailed: Any check failed; the message says which and with what values.
    """
    import httpx

    headers = {"X-API-Key": api_key}
    info, predict = (f"/models/{model_name}", f"/models/{model_name}/predict") if model_name else ("/model", "/predict")
    with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SmokeTestFailed(f"{base_url}/ready did not answer 200 within {timeout:.0f} s")
            time.sleep(0.5)
        served = client.get(info)
        if served.status_code != 200 or _json(served).get("model_version") != expected_version:
            raise SmokeTestFailed(
                f"{base_url}{info} answered {served.status_code} {served.text[:200]}; expected v{expected_version}"
            )
        started = time.perf_counter()
        single = client.post(predict, json=records[0])
        batch = client.post(f"{predict}/batch", json={"records": records})
        elapsed = time.perf_counter() - started
    for name, response in ((predict, single), (f"{predict}/batch", batch)):
        if response.status_code != 200:
            raise SmokeTestFailed(f"{base_url}{name} answered {response.status_code}: {response.text[:300]}")
    predictions = _json(batch).get("predictions") or []
    if len(predictions) != len(labels):
        raise SmokeTestFailed(f"{predict}/batch answered {len(predictions)} predictions for {len(labels)} records")
    versions = {p["model_version"] for p in predictions} | {single.json()["model_version"]}
    if versions != {expected_version}:
        raise SmokeTestFailed(f"predictions came from version(s) {sorted(versions)}, expected v{expected_version}")
    if single.json()["label"] != predictions[0]["label"]:
        raise SmokeTestFailed("the single and the batch prediction of the same record disagree")
    hits = sum(p["label"] == label for p, label in zip(predictions, labels, strict=True))
    accuracy = hits / len(labels)
    if accuracy < min_accuracy:
        raise SmokeTestFailed(
            f"v{expected_version} scored accuracy {accuracy:.3f} on {len(labels)} smoke records "
            f"(minimum {min_accuracy:.3f})"
        )
    return {
        "url": base_url,
        "model_version": expected_version,
        "records": len(labels),
        "accuracy": round(accuracy, 4),
        "seconds": round(elapsed, 3),
    }


def _json(response: Any) -> dict[str, Any]:
    """The body as a JSON object, or an empty one (a malformed answer fails the checks, not the parser)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
