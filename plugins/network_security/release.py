"""The delivery task groups. The training DAG's ``release``: candidate, approval (manual only), image, candidate
beside baseline, ``shadow`` and ``canary_<p>`` (reschedule sensors), ``complete``, ``abort``, ``outcome``. The deploy
DAG's ``deploy``: redeploy / rollback of the champion. Decisions: tasks.release*, tasks.delivery.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import PokeReturnValue, TaskGroup, TriggerRule, chain, task

from network_security import alerts, assets, runtime
from network_security.dag_parts import from_plan, step
from tasks import delivery, release, release_run
from tasks.alerts import release_aborted
from tasks.plan import RunPlan
from tasks.release import ReleaseAborted

GROUP_ID = "release"
DEPLOY_ID = "deploy"
ALIASES_POOL = "aliases"
POKE_SECONDS = 2  # fixed at parse time (no I/O then); AWS fleets bake minutes, 2 s pokes cost little
STAGE_TIMEOUT = timedelta(hours=6)
APPROVAL_TIMEOUT = timedelta(minutes=release.ApprovalConfig().timeout_minutes)
STAGES = ("shadow", "canary_10", "canary_50", "canary_100")


def _pull(ti: Any, *task_ids: str, key: str = "return_value", group: str = GROUP_ID) -> list[Any]:
    return [ti.xcom_pull(task_ids=f"{group}.{t}", key=key) for t in task_ids]


def stage_sensor(stage: str) -> Any:
    """The reschedule-mode sensor of one stage: done or poke again; an abort fails the stage for good, its verdict
    kept as XCom ``abort_verdict`` (for ``abort``)."""

    @task.sensor(task_id=stage, poke_interval=POKE_SECONDS, timeout=STAGE_TIMEOUT.total_seconds(),
                 mode="reschedule", doc_md=release_run.stage_poke.__doc__)  # fmt: skip
    def poke(plan: dict, chosen: dict, deployed: dict, dag_run=None, ti=None) -> PokeReturnValue:
        fault = (dag_run.conf or {}).get("release_fault") if dag_run else None
        verdict = runtime.call(release_run.stage_poke, RunPlan.from_xcom(plan), stage, chosen, deployed, fault=fault)
        if verdict["status"] == release.ABORT:
            from airflow.sdk.exceptions import AirflowFailException

            ti.xcom_push(key="abort_verdict", value={**verdict, "stage": stage})
            raise AirflowFailException(str(ReleaseAborted(stage, verdict)))
        return PokeReturnValue(is_done=release.done(verdict), xcom_value=verdict)

    return poke


def release_group(plan: Any, evaluation: Any) -> TaskGroup:
    """Build the ``release`` group after the gate's ``promote`` branch (``candidate`` is its first task)."""
    evaluation_task_id = evaluation.operator.task_id
    with TaskGroup(GROUP_ID, tooltip="Candidate -> approval -> shadow -> canary steps -> champion") as group:

        @task.branch(task_id="route_approval")
        def route_approval(chosen: dict) -> str:
            """``approval: manual`` for this dataset: a human decides first; ``auto``: straight to the deploy."""
            return f"{GROUP_ID}.{release_run.approval_route(chosen)}"

        approve_release = ApprovalOperator(
            task_id="approve_release",
            subject="Release {{ ti.xcom_pull(task_ids='release.candidate')['model_name'] }} "
            "v{{ ti.xcom_pull(task_ids='release.candidate')['candidate_version'] }}?",
            body="{{ ti.xcom_pull(task_ids='release.candidate')['approval_prompt'] }}",
            defaults=["Reject"],  # no answer within the timeout: rejected (logged as timed_out)
            response_timeout=APPROVAL_TIMEOUT,
            doc_md="Human-in-the-loop approval (Required Actions): the prompt links the model card and the gate's "
            "metrics. Reject or timeout: no release, champion untouched.",
        )

        @task(task_id="complete", pool=ALIASES_POOL, outlets=[assets.CHAMPION, assets.SERVED_MODEL])
        def complete(plan: dict, chosen: dict, deployed: dict, evaluation: dict, ti=None, outlet_events=None) -> dict:
            """Every stage passed: champion -> candidate (compare-and-swap), 100 % on every target."""
            run = RunPlan.from_xcom(plan)
            stages = dict(zip(STAGES, _pull(ti, *STAGES), strict=True))
            with runtime.failures(run):  # another run moved champion meanwhile: fail (no retry), then abort
                done = runtime.call(release_run.complete, run, chosen, deployed, stages, evaluation=evaluation)
            champion, served = release_run.completion_events(run, done, chosen, deployed, evaluation)
            outlet_events[assets.CHAMPION].extra, outlet_events[assets.SERVED_MODEL].extra = champion, served
            return done

        @task(task_id="abort", trigger_rule=TriggerRule.ONE_FAILED)
        def abort(plan: dict, run_id=None, ti=None) -> dict:
            """A stage failed: weight 0 on every target, the baseline serves, champion untouched; logged, alerted."""
            chosen, deployed = _pull(ti, "candidate", "deploy_candidate")
            evaluation = ti.xcom_pull(task_ids=evaluation_task_id)
            with runtime.failures():  # the run failed before the release: nothing to abort (its own failure stands)
                delivery.require_release(chosen)
            stage, verdict = release_run.first_abort(_pull(ti, *STAGES, key="abort_verdict"))
            run = RunPlan.from_xcom(plan)
            outcome = runtime.call(release_run.abort, run, chosen, deployed, stage, verdict, evaluation=evaluation)
            alerts.send(release_aborted(run.model_name, chosen["candidate_version"], run_id, outcome))
            return outcome

        @task(task_id="outcome", trigger_rule=TriggerRule.ALL_DONE)
        def outcome(plan: dict, evaluation: dict, ti=None) -> dict:
            """What became of the candidate: completed, aborted (the run fails), or not released (approval)."""
            run = RunPlan.from_xcom(plan)
            with runtime.failures(run):
                pulled = _pull(ti, "candidate", "complete", "abort", "approve_release")
                return runtime.call(release_run.finish, run, evaluation, *pulled)

        chosen = step("candidate", release_run.candidate)(plan, evaluation)
        route = route_approval(chosen)
        image = step(
            "publish_image", release_run.publish_candidate, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS
        )(plan, chosen)
        deployed = step("deploy_candidate", release_run.deploy_candidate)(plan, chosen, image)
        stages = [stage_sensor(stage)(plan, chosen, deployed) for stage in STAGES]
        completed = complete(plan, chosen, deployed, evaluation)
        chain(route, [approve_release, image])
        chain(approve_release, image)
        chain(deployed, *stages, completed)
        aborted = abort(plan)
        chain([image, deployed, *stages, completed], aborted)
        chain([completed, aborted], outcome(plan, evaluation))
    return group


def deploy_group(plan: Any) -> TaskGroup:
    """Build the ``deploy`` task group for the champion of ``plan``'s model (``plan``: the ``plan_run`` XComArg)."""
    plan_task_id = plan.operator.task_id
    with TaskGroup(DEPLOY_ID, tooltip="Ship the champion: ECR image, EC2 via SSM, local server, smoke test") as group:
        # ``plan`` is pulled, not passed: as a direct upstream its success would satisfy
        # none_failed_min_one_success even when nothing was released (champion kept).
        @task(
            task_id="record_deployment",
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            outlets=[assets.SERVED_MODEL],
        )
        def record_deployment(resolved: dict, image: dict, ti=None, outlet_events=None) -> dict:
            """One row per target in the deployment log (skipped targets have no row)."""
            shipped = _pull(ti, "ec2_fleet", "rollout_ec2", "serve_local", "smoke_test", group=DEPLOY_ID)
            run = RunPlan.from_xcom(ti.xcom_pull(task_ids=plan_task_id))
            recorded = runtime.call(delivery.record, run, resolved, image, *shipped)
            outlet_events[assets.SERVED_MODEL].extra = recorded
            return recorded

        resolved = step("resolve_release", delivery.resolve_release)(plan)
        image = step("publish_image", delivery.publish)(plan, resolved)
        fleet = step("ec2_fleet", delivery.fleet)(plan, resolved, image)
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
        smoke = step("smoke_test", delivery.smoke)(plan, resolved, local)
        recorded = record_deployment(resolved, image)
        chain([resolved, image], local)
        chain(fleet, rollout_ec2, recorded)
        chain(smoke, recorded)

    return group
