"""The deploy task group, shared by the training DAG and the deploy/rollback DAG.

``publish_image`` (ECR) → ``ec2_fleet`` → ``rollout_ec2`` (SSM Run Command, blue/green on
the host) and ``serve_local`` (the local uvicorn target) → ``smoke_test`` →
``record_deployment``; ``rollback`` runs only when one of them failed: ``champion`` goes
back to ``previous_champion``, the targets go back to it, the rollback is logged, and the
task fails so the run does too. Targets not in ``deploy_targets`` are skipped.

The logic is in ``tasks.deploy``, ``tasks.local_server`` and ``tasks.registry``; the
functions here only bind them to Airflow connections.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator
from airflow.sdk import TaskGroup, TriggerRule, chain, task

from network_security import assets
from tasks.config import AWS_CONN_ID
from tasks.deploy import parse_targets

log = logging.getLogger(__name__)

GROUP_ID = "deploy"
DEPLOYMENT_LOG_FIELDS = (
    "deployment_id",
    "dag_run_id",
    "action",
    "target",
    "model_name",
    "model_version",
    "image_uri",
    "instance_ids",
    "endpoint",
    "status",
    "detail",
    "recorded_at",
)


def _skip_unless(plan: dict[str, Any], target: str) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    if target not in parse_targets(plan["deploy_targets"]):
        raise AirflowSkipException(f"{target!r} is not in deploy_targets={plan['deploy_targets']!r}")


def _aws_region(plan: dict[str, Any]) -> str:
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=plan["aws_conn_id"], client_type="sts").conn_region_name or "us-east-1"


def resolve_release(plan: dict[str, Any]) -> dict[str, Any]:
    """The champion as the deploy sees it (version, run, test split for the smoke test)."""
    from tasks.registry import release_info

    return release_info(tracking_uri=plan["mlflow_tracking_uri"], model_name=plan["model_name"])


def publish_image(plan: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    from airflow.providers.amazon.aws.hooks.ecr import EcrHook

    from tasks.deploy import load_deploy_config
    from tasks.deploy import publish_image as publish

    hook = EcrHook(aws_conn_id=plan["aws_conn_id"])

    def login() -> tuple[str, str]:
        credentials = hook.get_temporary_credentials()[0]
        return credentials.username, credentials.password

    return publish(
        hook.conn,
        load_deploy_config().ecr,
        model_name=release["model_name"],
        model_version=release["model_version"],
        labels={"network-security.mlflow-run-id": release["run_id"], "network-security.git-sha": release["git_sha"]},
        registry_login=login,
    )


def ec2_fleet(plan: dict[str, Any], release: dict[str, Any], image: dict[str, Any]) -> dict[str, Any]:
    """The tagged serving instances (one launched with user-data if none runs) and the rollout commands."""
    from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
    from airflow.providers.amazon.aws.hooks.ssm import SsmHook

    from tasks.deploy import ensure_instances, load_deploy_config, rollout_commands, user_data

    _skip_unless(plan, "ec2")
    config = load_deploy_config().ec2
    region = _aws_region(plan)
    script = user_data(
        config,
        region=region,
        tracking_uri=plan["mlflow_tracking_uri"],
        environment={"MODEL_NAME": release["model_name"], "PREDICTION_LOG_BUCKET": plan["lake_bucket"]},
    )
    fleet = ensure_instances(
        EC2Hook(aws_conn_id=plan["aws_conn_id"], api_type="client_type").conn,
        SsmHook(aws_conn_id=plan["aws_conn_id"]).conn,
        config,
        script,
    )
    commands = rollout_commands(
        image_uri=image["image_uri"], model_version=release["model_version"], region=region, config=config
    )
    return {**fleet, "commands": commands, "tags": config.tags}


def _local_server(plan: dict[str, Any], release: dict[str, Any]) -> tuple[Any, str]:
    from airflow.sdk import BaseHook

    from tasks.local_server import LocalServer

    connection = BaseHook.get_connection(plan["serving_conn_id"])
    if not connection.password:
        raise ValueError(
            f"connection {plan['serving_conn_id']!r} has no password: set the model server's API key there"
        )
    options = _aws_environment(plan)
    state_dir = Path(os.environ.get("NS_STATE_DIR", ".state")).resolve() / "serving"
    server = LocalServer(
        state_dir=state_dir,
        host=connection.host or "127.0.0.1",
        port=int(connection.port or 8000),
        environment={
            "MLFLOW_TRACKING_URI": plan["mlflow_tracking_uri"],
            "MODEL_NAME": release["model_name"],
            "MODEL_ALIAS": "champion",
            "DATASET": plan["dataset"],
            "API_KEY": connection.password,
            "PREDICTION_LOG_BUCKET": plan["lake_bucket"],
            **options,
        },
    )
    return server, connection.password


def _aws_environment(plan: dict[str, Any]) -> dict[str, str]:
    """The AWS connection as the environment of a process Airflow does not manage (the model server)."""
    from network_security.runtime import boto3_options

    options = boto3_options(plan)
    names = {
        "aws_access_key_id": "AWS_ACCESS_KEY_ID",
        "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN",
        "region_name": "AWS_DEFAULT_REGION",
        "endpoint_url": "AWS_ENDPOINT_URL",
    }
    return {names[key]: str(value) for key, value in options.items() if value and key in names}


def serve_local(plan: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    """Start the local model server if needed and make it serve the champion (in-process swap)."""
    _skip_unless(plan, "local")
    server, api_key = _local_server(plan, release)
    state = server.ensure_started()
    reload = server.reload(api_key)
    log.info("local model server %s at %s: v%s -> v%s", state, server.url, reload["old_version"], reload["new_version"])
    return {"url": server.url, "process": state, **reload}


def smoke_test(plan: dict[str, Any], release: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """Labelled held-out records against the freshly switched local server."""
    from network_security.runtime import s3_client
    from tasks import storage
    from tasks.dataset_spec import load_spec
    from tasks.deploy import load_deploy_config
    from tasks.deploy import smoke_test as run_smoke_test

    config = load_deploy_config().smoke
    spec = load_spec(plan["dataset"])
    test = storage.read_parquet(s3_client(plan), storage.parse_s3_uri(release["test_uri"]))
    sample = test.sample(n=min(config.records, len(test)), random_state=0)
    min_accuracy = plan.get("smoke_min_accuracy")
    _, api_key = _local_server(plan, release)
    return run_smoke_test(
        local["url"],
        api_key,
        json.loads(sample[spec.feature_names].to_json(orient="records")),
        sample[spec.target.name].tolist(),
        expected_version=release["model_version"],
        min_accuracy=config.min_accuracy if min_accuracy is None else float(min_accuracy),
        timeout=config.timeout_seconds,
    )


def record_deployments(plan: dict[str, Any], rows: list[dict[str, Any]], dag_run_id: str, action: str) -> None:
    """One row per target in the monitoring store's deployment log (SQL hook of the connection)."""
    from airflow.sdk import BaseHook

    now = dt.datetime.now(dt.UTC).isoformat()
    values = [
        (
            f"{dag_run_id}/{row['target']}/{action}",
            dag_run_id,
            action,
            row["target"],
            row["model_name"],
            row["model_version"],
            row.get("image_uri"),
            json.dumps(row["instance_ids"]) if row.get("instance_ids") is not None else None,
            row.get("endpoint"),
            row["status"],
            row["detail"],
            now,
        )
        for row in rows
    ]
    hook = BaseHook.get_connection(plan["monitoring_conn_id"]).get_hook()
    hook.insert_rows(
        "deployment_log", values, target_fields=DEPLOYMENT_LOG_FIELDS, replace=True, replace_index=["deployment_id"]
    )


def record_deployment(
    plan: dict[str, Any],
    release: dict[str, Any],
    image: dict[str, Any],
    fleet: dict[str, Any] | None,
    local: dict[str, Any] | None,
    smoke: dict[str, Any] | None,
    dag_run_id: str,
) -> dict[str, Any]:
    base = {"model_name": release["model_name"], "model_version": release["model_version"]}
    rows = []
    if fleet:
        detail = f"SSM blue/green rollout of {image['image_uri']} on {len(fleet['instance_ids'])} instance(s)"
        rows.append(
            {**base, "target": "ec2", "image_uri": image["image_uri"], "instance_ids": fleet["instance_ids"],
             "status": "deployed", "detail": detail}
        )  # fmt: skip
    if local:
        detail = f"reloaded v{local['old_version']} -> v{local['new_version']}; smoke: {json.dumps(smoke)}"
        rows.append(
            {**base, "target": "local", "image_uri": image["image_uri"], "endpoint": local["url"],
             "status": "deployed", "detail": detail}
        )  # fmt: skip
    record_deployments(plan, rows, dag_run_id, "deploy")
    return {
        **base,
        "image_uri": image["image_uri"],
        "targets": [row["target"] for row in rows],
        "endpoint": local["url"] if local else None,
    }


def roll_back(
    plan: dict[str, Any], release: dict[str, Any] | None, fleet: dict[str, Any] | None, dag_run_id: str
) -> dict[str, Any]:
    """Champion back to previous_champion, every target back to it, logged.

    Raises:
        AirflowFailException: There is nothing to roll back to (first release).
        AirflowSkipException: No release was resolved (the run failed before the deploy).
    """
    from airflow.providers.amazon.aws.hooks.ssm import SsmHook
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from tasks.deploy import load_deploy_config, rollout_commands
    from tasks.registry import NothingToRollBack
    from tasks.registry import roll_back as move_aliases

    if release is None:
        # one_failed also fires on upstream_failed: a run that failed before the deploy (a
        # rejected drop, say) reaches here with nothing released. Its own failure stands.
        raise AirflowSkipException("no release was resolved, so nothing was deployed and nothing is rolled back")
    failed = f"deploy of {release['model_name']} v{release['model_version']} failed"
    try:
        aliases = move_aliases(
            tracking_uri=plan["mlflow_tracking_uri"],
            model_name=release["model_name"],
            reason=f"{failed} ({dag_run_id})",
        )
    except NothingToRollBack as err:
        record_deployments(
            plan,
            [{**release, "target": t, "status": "rollback_failed", "detail": str(err)}
             for t in parse_targets(plan["deploy_targets"])],
            dag_run_id,
            "rollback",
        )  # fmt: skip
        raise AirflowFailException(f"{failed} and cannot be rolled back: {err}") from err
    restored = aliases["champion_version"]
    rows = []
    targets = parse_targets(plan["deploy_targets"])
    if "ec2" in targets and fleet:
        ssm = SsmHook(aws_conn_id=plan["aws_conn_id"]).conn
        commands = rollout_commands(
            image_uri="", model_version=restored, region=_aws_region(plan), config=load_deploy_config().ec2,
            action="rollback",
        )  # fmt: skip
        sent = ssm.send_command(
            InstanceIds=fleet["instance_ids"],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": commands},
            Comment=f"roll back to v{restored}"[:100],
        )["Command"]["CommandId"]
        rows.append(
            {"target": "ec2", "instance_ids": fleet["instance_ids"], "status": "rolled_back",
             "detail": f"SSM command {sent}: nginx back to the previous slot"}
        )  # fmt: skip
    if "local" in targets:
        server, api_key = _local_server(plan, release)
        if server.pid() is not None:
            reload = server.reload(api_key)
            rows.append(
                {"target": "local", "endpoint": server.url, "status": "rolled_back",
                 "detail": f"reloaded v{reload['old_version']} -> v{reload['new_version']}"}
            )  # fmt: skip
    record_deployments(
        plan,
        [{**row, "model_name": release["model_name"], "model_version": restored} for row in rows],
        dag_run_id,
        "rollback",
    )
    # The task succeeds (the rollback worked); the run still fails, loudly: the failed deploy
    # task stays red and record_deployment, a leaf, is upstream_failed.
    log.error("%s; rolled back: champion is v%s again and serves on %s", failed, restored, list(targets))
    return {"rolled_back_version": aliases["rolled_back_version"], "champion_version": restored, "targets": rows}


def deploy_group(plan: Any, *, rollback_on_failure: bool = True, ssm_waiter_delay: int = 10) -> TaskGroup:
    """Build the ``deploy`` task group for the champion of ``plan``'s model.

    Args:
        plan: The ``plan_run`` output (XComArg).
        rollback_on_failure: Add the ``rollback`` task (the rollback DAG itself does not).
        ssm_waiter_delay: Seconds between SSM command status checks.
    """
    with TaskGroup(GROUP_ID, tooltip="Ship the champion: ECR image, EC2 via SSM, local server, smoke test") as group:

        @task(task_id="resolve_release")
        def resolve_release_task(plan: dict) -> dict:
            """The champion's version, MLflow run and held-out split (from the registry)."""
            return resolve_release(plan)

        @task(task_id="publish_image")
        def publish_image_task(plan: dict, release: dict) -> dict:
            """Serving image of this release in ECR (scan on push, immutable tag = model version)."""
            return publish_image(plan, release)

        @task(task_id="ec2_fleet")
        def ec2_fleet_task(plan: dict, release: dict, image: dict) -> dict:
            """Tagged serving instances (launch one with user-data if none runs) and the rollout script."""
            return ec2_fleet(plan, release, image)

        @task(task_id="serve_local")
        def serve_local_task(plan: dict, release: dict) -> dict:
            """The local uvicorn model server, started if needed, reloaded to the champion."""
            return serve_local(plan, release)

        @task(task_id="smoke_test")
        def smoke_test_task(plan: dict, release: dict, local: dict) -> dict:
            """Held-out records against the switched server: version, answers, accuracy."""
            return smoke_test(plan, release, local)

        # ``plan`` is pulled, not passed: as a direct upstream its success would satisfy
        # none_failed_min_one_success even when nothing was released (champion kept).
        plan_task_id = plan.operator.task_id

        @task(
            task_id="record_deployment",
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            outlets=[assets.SERVED_MODEL],
        )
        def record_deployment_task(release: dict, image: dict, run_id=None, ti=None, outlet_events=None) -> dict:
            """One row per target in the deployment log (skipped targets have no row)."""
            fleet, local, smoke = (
                ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}") for t in ("ec2_fleet", "serve_local", "smoke_test")
            )
            plan = ti.xcom_pull(task_ids=plan_task_id)
            recorded = record_deployment(plan, release, image, fleet, local, smoke, run_id)
            outlet_events[assets.SERVED_MODEL].extra = {
                k: recorded[k] for k in ("model_name", "model_version", "image_uri", "targets", "endpoint")
            }
            return recorded

        release = resolve_release_task(plan)
        image = publish_image_task(plan, release)
        fleet = ec2_fleet_task(plan, release, image)
        rollout_ec2 = SsmRunCommandOperator(
            task_id="rollout_ec2",
            doc_md="Blue/green on each host through SSM Run Command: new container, health and version check, "
            "nginx switch; the old container is kept for rollback.",
            aws_conn_id=AWS_CONN_ID,
            document_name="AWS-RunShellScript",
            run_command_kwargs={
                "InstanceIds": "{{ ti.xcom_pull(task_ids='deploy.ec2_fleet')['instance_ids'] }}",
                "Parameters": {"commands": "{{ ti.xcom_pull(task_ids='deploy.ec2_fleet')['commands'] }}"},
                "Comment": "network-security serving rollout",
            },
            wait_for_completion=True,
            # Waits on the worker even where deferral is the default (make airflow, distributed):
            # the command takes seconds, and the trigger's ListCommandInvocations is not
            # implemented by the emulator, so a deferred rollout fails there.
            deferrable=False,
            waiter_delay=ssm_waiter_delay,
            waiter_max_attempts=60,
        )
        local = serve_local_task(plan, release)
        smoke = smoke_test_task(plan, release, local)
        recorded = record_deployment_task(release, image)
        chain(image, local)
        chain(fleet, rollout_ec2, recorded)
        chain(smoke, recorded)

        if rollback_on_failure:

            @task(task_id="rollback", trigger_rule=TriggerRule.ONE_FAILED)
            def rollback_task(plan: dict, run_id=None, ti=None) -> dict:
                """Only after a failure: champion back to previous_champion on every target (the run still fails)."""
                release = ti.xcom_pull(task_ids=f"{GROUP_ID}.resolve_release")
                fleet = ti.xcom_pull(task_ids=f"{GROUP_ID}.ec2_fleet")
                return roll_back(plan, release, fleet, run_id)

            chain([release, image, fleet, rollout_ec2, local, smoke], rollback_task(plan))
    return group
