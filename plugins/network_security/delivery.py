"""The deploy DAG's ``deploy`` group (redeploy / rollback of the champion; training releases through
``network_security.release``): steps of ``tasks.delivery`` on clients from the plan's connections.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator
from airflow.sdk import TaskGroup, TriggerRule, chain, task

from network_security import assets, runtime
from network_security.dag_parts import from_plan, step
from tasks import delivery
from tasks.plan import RunPlan

GROUP_ID = "deploy"


def deploy_group(plan: Any) -> TaskGroup:
    """Build the ``deploy`` task group for the champion of ``plan``'s model (``plan``: the ``plan_run`` XComArg)."""
    plan_task_id = plan.operator.task_id
    with TaskGroup(GROUP_ID, tooltip="Ship the champion: ECR image, EC2 via SSM, local server, smoke test") as group:
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
            run = RunPlan.from_xcom(ti.xcom_pull(task_ids=plan_task_id))
            rows = delivery.deployed_rows(
                dag_run_id=run_id, release=release, image=image, fleet=fleet, rollout_command_id=command,
                local=local, smoke=smoke,
            )  # fmt: skip
            recorded = delivery.record_deployment(runtime.store(run), rows, release)
            outlet_events[assets.SERVED_MODEL].extra = recorded
            return recorded

        release = step("resolve_release", delivery.resolve_release)(plan)
        image = step("publish_image", delivery.publish)(plan, release)
        fleet = step("ec2_fleet", delivery.fleet)(plan, release, image)
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
            waiter_delay=10,
            waiter_max_attempts=60,
        )
        local = step("serve_local", delivery.serve_local)(plan)
        smoke = step("smoke_test", delivery.smoke)(plan, release, local)
        recorded = record_deployment(release, image)
        chain([release, image], local)
        chain(fleet, rollout_ec2, recorded)
        chain(smoke, recorded)

    return group
