"""The deploy DAG's ``deploy`` group (redeploy / rollback of the champion; training releases through
``network_security.release``): steps of ``tasks.delivery`` on clients from the plan's connections.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator
from airflow.sdk import TaskGroup, TriggerRule, chain, task

from network_security import assets, runtime
from network_security.dag_parts import from_plan
from tasks import delivery

GROUP_ID = "deploy"


def _local_server(plan: Any) -> tuple[Any, str | None]:
    """The local model server on the plan's serving connection, and its API key (the connection's password)."""
    connection = runtime.connection(plan.settings.serving_conn_id)
    return delivery.model_server_on(plan, connection, runtime.aws_options(plan)), connection.password


def _registry_login(plan: Any) -> Any:
    from airflow.providers.amazon.aws.hooks.ecr import EcrHook

    def login() -> tuple[str, str]:
        credentials = EcrHook(aws_conn_id=plan.settings.aws_conn_id).get_temporary_credentials()[0]
        return credentials.username, credentials.password

    return login


def deploy_group(plan: Any, *, ssm_waiter_delay: int = 10) -> TaskGroup:
    """Build the ``deploy`` task group for the champion of ``plan``'s model (``plan``: the ``plan_run`` XComArg)."""
    plan_task_id = plan.operator.task_id
    with TaskGroup(GROUP_ID, tooltip="Ship the champion: ECR image, EC2 via SSM, local server, smoke test") as group:

        @task(task_id="resolve_release")
        def resolve_release(plan: dict) -> dict:
            """The champion's version, MLflow run and held-out split (from the registry)."""
            return delivery.resolve_release(runtime.run_plan(plan))

        @task(task_id="publish_image")
        def publish_image(plan: dict, release: dict) -> dict:
            """Serving image of this release in ECR (scan on push, immutable tag = model version)."""
            run = runtime.run_plan(plan)
            return delivery.publish(runtime.aws_client(run, "ecr"), release, _registry_login(run))

        @task(task_id="ec2_fleet")
        def ec2_fleet(plan: dict, release: dict, image: dict) -> dict:
            """Tagged serving instances (launch one with user-data if none runs) and the rollout script."""
            run = runtime.run_plan(plan)
            with runtime.failures(run):
                ec2, ssm = runtime.aws_client(run, "ec2"), runtime.aws_client(run, "ssm")
                return delivery.fleet(run, ec2, ssm, runtime.aws_region(run), release, image)

        @task(task_id="serve_local")
        def serve_local(plan: dict, release: dict) -> dict:
            """The local uvicorn model server, started if needed, reloaded to the champion."""
            run = runtime.run_plan(plan)
            with runtime.failures(run):
                delivery.require_target(run, "local")
                return delivery.serve_local(run, _local_server(run)[0])

        @task(task_id="smoke_test")
        def smoke_test(plan: dict, release: dict, local: dict) -> dict:
            """Held-out records against the switched server: version, answers, accuracy."""
            run = runtime.run_plan(plan)
            with runtime.failures(run):
                return delivery.smoke(run, runtime.s3(run), release, local, _local_server(run)[1])

        # ``plan`` is pulled, not passed: as a direct upstream its success would satisfy
        # none_failed_min_one_success even when nothing was released (champion kept).
        @task(
            task_id="record_deployment",
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            outlets=[assets.SERVED_MODEL],
        )
        def record_deployment(release: dict, image: dict, run_id=None, ti=None, outlet_events=None) -> dict:
            """One row per target in the deployment log (skipped targets have no row)."""
            fleet, command, local, smoke = (
                ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}")
                for t in ("ec2_fleet", "rollout_ec2", "serve_local", "smoke_test")
            )
            run = runtime.run_plan(ti.xcom_pull(task_ids=plan_task_id))
            rows = delivery.deployed_rows(
                dag_run_id=run_id, release=release, image=image, fleet=fleet, rollout_command_id=command,
                local=local, smoke=smoke,
            )  # fmt: skip
            recorded = delivery.record_deployment(runtime.store(run), rows, release)
            outlet_events[assets.SERVED_MODEL].extra = recorded
            return recorded

        release = resolve_release(plan)
        image = publish_image(plan, release)
        fleet = ec2_fleet(plan, release, image)
        rollout_ec2 = SsmRunCommandOperator(
            task_id="rollout_ec2",
            doc_md="Blue/green on each host through SSM Run Command: new container, health and version check, "
            "nginx switch; the old container is kept for rollback.",
            aws_conn_id=from_plan("settings", "aws_conn_id", plan_task_id=plan_task_id),
            document_name="AWS-RunShellScript",
            run_command_kwargs={
                "InstanceIds": "{{ ti.xcom_pull(task_ids='deploy.ec2_fleet')['instance_ids'] }}",
                "Parameters": {"commands": "{{ ti.xcom_pull(task_ids='deploy.ec2_fleet')['commands'] }}"},
                "Comment": "network-security serving rollout",
            },
            wait_for_completion=True,
            # Waits on the worker even where deferral is the default: the command takes seconds, and the
            # emulator lacks the trigger's ListCommandInvocations (a deferred rollout fails there).
            deferrable=False,
            waiter_delay=ssm_waiter_delay,
            waiter_max_attempts=60,
        )
        local = serve_local(plan, release)
        smoke = smoke_test(plan, release, local)
        recorded = record_deployment(release, image)
        chain(image, local)
        chain(fleet, rollout_ec2, recorded)
        chain(smoke, recorded)

    return group
