"""The deploy task group's steps, as plain functions of the run plan and the clients they need.

``resolve_release`` → ``publish`` (ECR) → ``fleet`` (EC2) and ``serve_local`` (the local model
server) → ``smoke`` → ``record_deployment``: the deploy DAG's redeploy and rollback (a training
run releases through ``tasks.release_run``). Which targets a
release ships to is the plan's ``deploy_targets``: a step whose target is not selected raises
:class:`TargetNotSelected` (the DAG skips it). The building blocks (ECR, EC2/SSM scripts, the
smoke test) are in ``tasks.deploy``, the local server in ``tasks.local_server``, the alias moves
in ``tasks.registry``; the rows in ``tasks.monitoring_store``.

A step's parameters named after a client (``s3``, ``ecr``, ``ec2``, ``ssm``, ``cloudwatch``, ``region``,
``server``, ``api_key``, ``registry_login``, ``store``) get it from the plan's connections when the DAG
runs the step (``network_security.runtime.call``); :func:`client_wanted` says which are ``None``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tasks import deploy, monitoring_store, registry, storage
from tasks.config import state_dir
from tasks.local_server import LocalServer, serving_environment

if TYPE_CHECKING:
    import pandas as pd

    from tasks.dataset_spec import DatasetSpec
    from tasks.monitoring_store import Store
    from tasks.plan import RunPlan

log = logging.getLogger(__name__)


class TargetNotSelected(RuntimeError):
    """The step's target is not in ``deploy_targets``: nothing to do (the task is skipped)."""


class NothingReleased(RuntimeError):
    """The run failed before a release was resolved: nothing was deployed, nothing to roll back."""


class SmokeRecordsMissing(deploy.SmokeTestFailed):
    """The release's held-out split is gone: retrying will not bring it back."""


# The clients of one deploy target: a step gets ``None`` for them when the plan does not ship there.
TARGET_CLIENTS = {"server": "local", "api_key": "local", "ec2": "ec2", "ssm": "ec2", "cloudwatch": "ec2"}


def client_wanted(plan: RunPlan, client: str) -> bool:
    """Whether a step gets ``client`` built: always, unless it belongs to a target the plan does not ship to."""
    target = TARGET_CLIENTS.get(client)
    return target is None or target in plan.deploy_targets


def require_release(release: Mapping[str, Any] | None) -> None:
    """Raise :class:`NothingReleased` when no release was resolved (the run failed before the deploy).

    ``one_failed`` also fires on upstream_failed: a run that failed before the deploy (a rejected
    drop, a refused plan) reaches the rollback with nothing released. Its own failure stands.
    """
    if release is None:
        raise NothingReleased("no release was resolved, so nothing was deployed and nothing is rolled back")


def require_target(plan: RunPlan, target: str) -> None:
    """Raise :class:`TargetNotSelected` unless ``target`` is one of the plan's deploy targets."""
    if target not in plan.deploy_targets:
        raise TargetNotSelected(f"{target!r} is not in deploy_targets={plan.settings.deploy_targets!r}")


def choose_release(plan: RunPlan, dag_run_id: str) -> dict[str, Any]:
    """The deploy DAG's first step: for ``rollback``, champion back to previous_champion first."""
    if plan.action != "rollback":
        return {"action": plan.action}
    moved = registry.roll_back(
        tracking_uri=plan.settings.mlflow_tracking_uri,
        model_name=plan.model_name,
        reason=f"{plan.action_reason} (rollback requested by {dag_run_id})",
        request_id=dag_run_id,
    )
    return {"action": plan.action, **moved}


def resolve_release(plan: RunPlan) -> dict[str, Any]:
    """The champion as the deploy sees it (version, run, git SHA, the held-out split for the smoke test)."""
    return registry.release_info(tracking_uri=plan.settings.mlflow_tracking_uri, model_name=plan.model_name)


def publish(
    ecr: Any, release: Mapping[str, Any], registry_login: Callable[[], tuple[str, str]] | None = None
) -> dict[str, Any]:
    """The release's serving image in ECR (scan on push, immutable tag = the model version)."""
    return deploy.publish_image(
        ecr,
        deploy.load_deploy_config().for_model(release["model_name"]).ecr,  # the model's own repository
        model_name=release["model_name"],
        model_version=release["model_version"],
        labels={"network-security.mlflow-run-id": release["run_id"], "network-security.git-sha": release["git_sha"]},
        registry_login=registry_login,
    )


def fleet(plan: RunPlan, ec2: Any, ssm: Any, region: str, release: Mapping[str, Any], image: Mapping[str, Any]) -> dict:
    """The tagged serving instances (one launched with user-data if none runs) and the rollout commands."""
    require_target(plan, "ec2")
    config = deploy.load_deploy_config().for_model(release["model_name"]).ec2  # the model's own fleet tags
    environment = {
        "MODEL_NAME": release["model_name"],
        "DATASET": plan.dataset,
        "PREDICTION_LOG_BUCKET": plan.settings.lake_bucket,
    }
    script = deploy.user_data(
        config, region=region, tracking_uri=plan.settings.mlflow_tracking_uri, environment=environment
    )
    instances = deploy.ensure_instances(ec2, ssm, config, script)
    commands = deploy.rollout_commands(
        image_uri=image["image_uri"], model_version=release["model_version"], region=region, config=config
    )
    return {**instances, "commands": commands, "tags": config.tags}


def model_server(
    plan: RunPlan,
    *,
    host: str,
    port: int,
    api_key: str | None,
    admin_api_key: str | None,
    aws_options: Mapping[str, Any],
) -> LocalServer:
    """The local model server of this plan's model (started by :func:`serve_local`).

    Raises:
        ValueError: No API key (the serving connection's password is empty) or no admin key
            (its ``admin_api_key`` extra is empty).
    """
    if not api_key:
        raise ValueError(
            f"connection {plan.settings.serving_conn_id!r} has no password: set the model server's API key there"
        )
    if not admin_api_key:
        raise ValueError(
            f"connection {plan.settings.serving_conn_id!r} has no `admin_api_key` extra: set the model "
            "server's admin key there (another secret than the API key; it guards /admin/*)"
        )
    folder = state_dir()
    environment = serving_environment(
        tracking_uri=plan.settings.mlflow_tracking_uri,
        model_name=plan.model_name,
        dataset=plan.dataset,
        api_key=api_key,
        admin_api_key=admin_api_key,
        prediction_log_bucket=plan.settings.lake_bucket,
        aws_options=aws_options,
    )
    return LocalServer(folder / "serving", host, port, environment, owner_id=str(folder))


def model_server_on(plan: RunPlan, connection: Any, aws_options: Mapping[str, Any]) -> LocalServer:
    """:func:`model_server` on the serving connection: host, port, the API key as password, the admin key as
    the ``admin_api_key`` extra (an Airflow ``Connection``, or anything with its attributes)."""
    return model_server(
        plan,
        host=connection.host or "127.0.0.1",
        port=int(connection.port or 8000),
        api_key=connection.password,
        admin_api_key=(connection.extra_dejson or {}).get("admin_api_key"),
        aws_options=aws_options,
    )


def serve_local(plan: RunPlan, server: LocalServer) -> dict[str, Any]:
    """Start the local model server if needed and make it serve this model's champion (in-process swap).

    The one local server serves every dataset's model: this adds the plan's model if it is new and
    reloads that model alone, so the other models' answers and versions stay as they were.
    """
    require_target(plan, "local")
    process = server.ensure_started()
    reload = server.serve(plan.model_name, plan.dataset)
    log.info(
        "local model server %s at %s: v%s -> v%s", process, server.url, reload["old_version"], reload["new_version"]
    )
    return {"url": server.url, "process": process, **reload}


def smoke_records(test: pd.DataFrame, spec: DatasetSpec, count: int, seed: int = 0) -> tuple[list[dict], list[Any]]:
    """``count`` labelled held-out rows (a fixed-seed sample): the request records and their labels."""
    sample = test.sample(n=min(count, len(test)), random_state=seed)
    return json.loads(sample[spec.feature_names].to_json(orient="records")), sample[spec.target.name].tolist()


def smoke(plan: RunPlan, s3: Any, release: Mapping[str, Any], local: Mapping[str, Any], api_key: str) -> dict:
    """Labelled held-out records against the freshly switched local server (version, answers, accuracy)."""
    config = deploy.load_deploy_config().smoke
    split = storage.parse_s3_uri(release["test_uri"])
    if not storage.exists(s3, split):
        raise SmokeRecordsMissing(
            f"the held-out split of v{release['model_version']} ({split.uri}) is not in S3, so there is "
            "nothing to smoke-test with; the embedded emulator forgets its buckets when it restarts: "
            "`make run` publishes, trains and ships again"
        )
    test = storage.read_parquet(s3, split)
    records, labels = smoke_records(test, plan.spec, config.records)
    minimum = config.min_accuracy if plan.smoke_min_accuracy is None else plan.smoke_min_accuracy
    return deploy.smoke_test(
        local["url"],
        api_key,
        records,
        labels,
        expected_version=release["model_version"],
        min_accuracy=minimum,
        timeout=config.timeout_seconds,
        model_name=release["model_name"],
    )


def deployed_rows(
    *,
    dag_run_id: str,
    release: Mapping[str, Any],
    image: Mapping[str, Any],
    fleet: Mapping[str, Any] | None,
    rollout_command_id: str | None,
    local: Mapping[str, Any] | None,
    smoke: Mapping[str, Any] | None,
    recorded_at: str | None = None,
) -> list[dict[str, Any]]:
    """One deployment-log row per target that shipped (a skipped target has none)."""
    recorded_at = recorded_at or monitoring_store.now()
    base = {
        "dag_run_id": dag_run_id,
        "action": "deploy",
        "model_name": release["model_name"],
        "model_version": release["model_version"],
        "status": "deployed",
        "recorded_at": recorded_at,
        "image_uri": image["image_uri"],
    }
    rows = []
    if fleet:
        command = f" (SSM command {rollout_command_id})" if rollout_command_id else ""
        detail = f"SSM blue/green rollout of {image['image_uri']} on {len(fleet['instance_ids'])} instance(s){command}"
        rows.append(
            monitoring_store.deployment_row(**base, target="ec2", instance_ids=fleet["instance_ids"], detail=detail)
        )
    if local:
        detail = f"reloaded v{local['old_version']} -> v{local['new_version']}; smoke: {json.dumps(smoke)}"
        rows.append(monitoring_store.deployment_row(**base, target="local", endpoint=local["url"], detail=detail))
    return rows


def record(
    store: Store, dag_run_id: str, release: Mapping[str, Any], image: Mapping[str, Any], fleet: Mapping[str, Any] | None,
    rollout_command_id: str | None, local: Mapping[str, Any] | None, smoke: Mapping[str, Any] | None,
) -> dict:  # fmt: skip
    """One row per target in the deployment log (skipped targets have no row); what was deployed where."""
    rows = deployed_rows(
        dag_run_id=dag_run_id, release=release, image=image, fleet=fleet, rollout_command_id=rollout_command_id,
        local=local, smoke=smoke,
    )  # fmt: skip
    return record_deployment(store, rows, release)


def record_deployment(store: Store, rows: Sequence[Mapping[str, Any]], release: Mapping[str, Any]) -> dict:
    """Write the rows; return what was deployed where (the served-model asset's details)."""
    monitoring_store.write(store, "deployment_log", rows)
    return {
        "model_name": release["model_name"],
        "model_version": release["model_version"],
        "image_uri": rows[0]["image_uri"] if rows else None,
        "targets": [row["target"] for row in rows],
        "endpoint": next((row["endpoint"] for row in rows if row["endpoint"]), None),
    }
