"""The training DAG's ``release`` group: candidate, approval (manual only), image, candidate beside baseline,
``shadow`` and ``canary_<p>`` (reschedule sensors), ``complete``, ``abort``, ``outcome``. Decisions: tasks.release*.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import PokeReturnValue, TaskGroup, TriggerRule, chain, task

from network_security import alerts, assets, runtime
from network_security.delivery import _local_server, _registry_login
from tasks import delivery, release, release_run
from tasks.alerts import release_aborted
from tasks.release import ReleaseAborted

GROUP_ID = "release"
ALIASES_POOL = "aliases"
POKE_SECONDS = 2  # fixed at parse time (no I/O then); AWS fleets bake minutes, 2 s pokes cost little
STAGE_TIMEOUT = timedelta(hours=6)
APPROVAL_TIMEOUT = timedelta(minutes=release.ApprovalConfig().timeout_minutes)


def _targets(plan: dict, *, cloudwatch: bool = True) -> tuple[Any, dict[str, Any]]:
    """The run plan and the clients of its targets, as the ``release_run`` steps' keyword arguments."""
    run = runtime.run_plan(plan)
    ec2 = "ec2" in run.deploy_targets
    targets = {"server": _local_server(run)[0] if "local" in run.deploy_targets else None,
               "ssm": runtime.aws_client(run, "ssm") if ec2 else None, "region": runtime.aws_region(run)}  # fmt: skip
    if cloudwatch:
        targets["cloudwatch"] = runtime.aws_client(run, "cloudwatch") if ec2 else None
    return run, targets


def _pull(ti: Any, *task_ids: str, key: str = "return_value") -> list[Any]:
    return [ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}", key=key) for t in task_ids]


def _stage_result(stage: str, verdict: dict, ti: Any) -> PokeReturnValue:
    """Done or poke again; an abort fails the stage for good, its verdict kept as XCom ``abort_verdict``."""
    if verdict["status"] == release.ABORT:
        from airflow.sdk.exceptions import AirflowFailException

        ti.xcom_push(key="abort_verdict", value={**verdict, "stage": stage})
        raise AirflowFailException(str(ReleaseAborted(stage, verdict)))
    return PokeReturnValue(is_done=release.done(verdict), xcom_value=verdict)


def release_group(plan: Any, evaluation: Any, *, steps: tuple[int, ...] = (10, 50, 100)) -> TaskGroup:
    """Build the ``release`` group after the gate's ``promote`` branch (``candidate`` is its first task)."""
    evaluation_task_id = evaluation.operator.task_id
    stage_ids = ["shadow", *[f"canary_{p}" for p in steps]]
    with TaskGroup(GROUP_ID, tooltip="Candidate -> approval -> shadow -> canary steps -> champion") as group:

        @task(task_id="candidate")
        def candidate(plan: dict, evaluation: dict, run_id=None) -> dict:
            """The gate passed: the challenger is a candidate (champion unchanged until the release completes)."""
            run = runtime.run_plan(plan)
            return release_run.candidate(run, runtime.store(run), evaluation, run_id)

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

        @task(task_id="publish_image", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
        def publish_image(plan: dict, chosen: dict) -> dict:
            """The candidate's serving image in ECR (scan on push, immutable tag = model version)."""
            run = runtime.run_plan(plan)
            release_info = {**chosen, "model_version": chosen["candidate_version"]}
            return delivery.publish(runtime.aws_client(run, "ecr"), release_info, _registry_login(run))

        @task(task_id="deploy_candidate")
        def deploy_candidate(plan: dict, chosen: dict, image: dict) -> dict:
            """The candidate beside the baseline on every target (EC2: idle slot, smoke-tested; no traffic)."""
            run, targets = _targets(plan)
            fleet = None
            if "ec2" in run.deploy_targets:
                release_info = {**chosen, "model_version": chosen["candidate_version"]}
                ec2 = runtime.aws_client(run, "ec2")
                fleet = delivery.fleet(run, ec2, targets["ssm"], targets["region"], release_info, image)
            return release_run.deploy_candidate(run, chosen, fleet=fleet, image=image if fleet else None, **targets)

        @task.sensor(task_id="shadow", poke_interval=POKE_SECONDS, timeout=STAGE_TIMEOUT.total_seconds(),
                     mode="reschedule")  # fmt: skip
        def shadow(plan: dict, chosen: dict, deployed: dict, ti=None) -> PokeReturnValue:
            """Mirrored traffic scored by the candidate; passes on agreement, score PSI and p99 (reschedule mode)."""
            run, targets = _targets(plan)
            return _stage_result("shadow", release_run.shadow_poke(run, chosen, deployed, **targets), ti)

        def canary_step(percent: int) -> Any:
            @task.sensor(task_id=f"canary_{percent}", poke_interval=POKE_SECONDS,
                         timeout=STAGE_TIMEOUT.total_seconds(), mode="reschedule")  # fmt: skip
            def canary(plan: dict, chosen: dict, deployed: dict, dag_run=None, ti=None) -> PokeReturnValue:
                """A canary step: the candidate answers this share of request ids for the bake time."""
                run, targets = _targets(plan)
                fault = (dag_run.conf or {}).get("release_fault") if dag_run else None
                verdict = release_run.canary_poke(run, chosen, deployed, percent, fault=fault, **targets)
                return _stage_result(f"canary_{percent}", verdict, ti)

            return canary

        @task(task_id="complete", pool=ALIASES_POOL, outlets=[assets.CHAMPION, assets.SERVED_MODEL])
        def complete(plan: dict, chosen: dict, deployed: dict, evaluation: dict, ti=None, outlet_events=None) -> dict:
            """Every stage passed: champion -> candidate (compare-and-swap), 100 % on every target."""
            run, targets = _targets(plan, cloudwatch=False)
            stages = dict(zip(stage_ids, _pull(ti, *stage_ids), strict=True))
            with runtime.failures(run):  # another run moved champion meanwhile: fail (no retry), then abort
                done = release_run.complete(run, runtime.store(run), chosen, deployed, stages, **targets,
                                            evaluation=evaluation)  # fmt: skip
            champion, served = release_run.completion_events(run, done, chosen, deployed, evaluation)
            outlet_events[assets.CHAMPION].extra, outlet_events[assets.SERVED_MODEL].extra = champion, served
            return done

        @task(task_id="abort", trigger_rule=TriggerRule.ONE_FAILED)
        def abort(plan: dict, run_id=None, ti=None) -> dict:
            """A stage failed: weight 0 on every target, the baseline serves, champion untouched; logged, alerted."""
            chosen, deployed = _pull(ti, "candidate", "deploy_candidate")
            if chosen is None:  # the run failed before the release: nothing to abort (its own failure stands)
                from airflow.sdk.exceptions import AirflowSkipException

                raise AirflowSkipException("no release candidate: nothing was deployed, nothing to abort")
            stage, verdict = release_run.first_abort(_pull(ti, *stage_ids, key="abort_verdict"))
            run, targets = _targets(plan, cloudwatch=False)
            outcome = release_run.abort(run, runtime.store(run), chosen, deployed, stage, verdict, **targets,
                                        evaluation=ti.xcom_pull(task_ids=evaluation_task_id))  # fmt: skip
            alerts.send(release_aborted(run.model_name, chosen["candidate_version"], run_id, outcome))
            return outcome

        @task(task_id="outcome", trigger_rule=TriggerRule.ALL_DONE)
        def outcome(plan: dict, evaluation: dict, run_id=None, ti=None) -> dict:
            """What became of the candidate: completed, aborted (the run fails), or not released (approval)."""
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            kind, value = release_run.outcome_of(*_pull(ti, "candidate", "complete", "abort", "approve_release"))
            if kind == "no_candidate":
                raise AirflowSkipException(value)
            if kind in ("aborted", "incomplete"):
                raise AirflowFailException(value)
            if kind == "not_released":
                run = runtime.run_plan(plan)
                return release_run.not_released(run, runtime.store(run), evaluation, value, run_id)
            return value

        chosen = candidate(plan, evaluation)
        route = route_approval(chosen)
        image = publish_image(plan, chosen)
        deployed = deploy_candidate(plan, chosen, image)
        stages = [shadow(plan, chosen, deployed), *[canary_step(p)(plan, chosen, deployed) for p in steps]]
        completed = complete(plan, chosen, deployed, evaluation)
        chain(route, [approve_release, image])
        chain(approve_release, image)
        chain(deployed, *stages, completed)
        aborted = abort(plan)
        chain([image, deployed, *stages, completed], aborted)
        chain([completed, aborted], outcome(plan, evaluation))
    return group
