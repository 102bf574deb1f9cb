"""The training DAG's ``release`` group: candidate, approval (manual only), image, the candidate beside the
baseline, ``shadow`` and ``canary_<p>`` (reschedule sensors: no slot held while a stage bakes), ``complete``
(moves ``champion``, pool ``aliases``), ``abort`` (on a failed stage), ``outcome``. Decisions: tasks.release*.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import PokeReturnValue, TaskGroup, TriggerRule, chain, task

from network_security import alerts, assets, runtime
from network_security.delivery import _local_server, _registry_login
from tasks import delivery, release, release_run
from tasks.release import ReleaseAborted

GROUP_ID = "release"
ALIASES_POOL = "aliases"
POKE_SECONDS = 2  # fixed at parse time (no I/O then); AWS fleets bake minutes, 2 s pokes cost little
STAGE_TIMEOUT = timedelta(hours=6)
APPROVAL_TIMEOUT = timedelta(minutes=release.ApprovalConfig().timeout_minutes)


def _targets(run: Any) -> tuple[Any, Any, Any, str]:
    server = _local_server(run)[0] if "local" in run.deploy_targets else None
    ssm = runtime.aws_client(run, "ssm") if "ec2" in run.deploy_targets else None
    cloudwatch = runtime.aws_client(run, "cloudwatch") if "ec2" in run.deploy_targets else None
    return server, ssm, cloudwatch, runtime.aws_region(run)


def _stage_result(stage: str, verdict: dict, ti: Any) -> PokeReturnValue:
    """Done (pass, skipped, proceed) or poke again (wait); an abort fails the stage for good, its verdict
    (reasons and the metrics that tripped it) kept as the XCom ``abort_verdict`` for ``abort``."""
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
            manual = chosen["approval"] == "manual"
            return f"{GROUP_ID}.approve_release" if manual else f"{GROUP_ID}.publish_image"

        approve_release = ApprovalOperator(
            task_id="approve_release",
            subject="Release {{ ti.xcom_pull(task_ids='release.candidate')['model_name'] }} "
            "v{{ ti.xcom_pull(task_ids='release.candidate')['candidate_version'] }}?",
            body="{{ ti.xcom_pull(task_ids='release.candidate')['approval_prompt'] }}",
            defaults=["Reject"],  # no answer within the timeout: rejected (logged as timed_out)
            response_timeout=APPROVAL_TIMEOUT,
            doc_md="Human-in-the-loop approval (Required Actions in the UI): the prompt links the model card "
            "and the gate's metrics. Reject or timeout: the release does not happen, champion untouched.",
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
            run = runtime.run_plan(plan)
            server, ssm, cloudwatch, region = _targets(run)
            fleet = None
            if "ec2" in run.deploy_targets:
                release_info = {**chosen, "model_version": chosen["candidate_version"]}
                fleet = delivery.fleet(run, runtime.aws_client(run, "ec2"), ssm, region, release_info, image)
            return release_run.deploy_candidate(
                run, chosen, server=server, fleet=fleet, image=image if fleet else None, ssm=ssm,
                cloudwatch=cloudwatch, region=region,
            )  # fmt: skip

        @task.sensor(task_id="shadow", poke_interval=POKE_SECONDS, timeout=STAGE_TIMEOUT.total_seconds(),
                     mode="reschedule")  # fmt: skip
        def shadow(plan: dict, chosen: dict, deployed: dict, ti=None) -> PokeReturnValue:
            """Mirrored traffic scored by the candidate; passes on agreement, score PSI and p99 (reschedule mode)."""
            run = runtime.run_plan(plan)
            server, ssm, cloudwatch, region = _targets(run)
            verdict = release_run.shadow_poke(
                run, chosen, deployed, server=server, ssm=ssm, cloudwatch=cloudwatch, region=region
            )
            return _stage_result("shadow", verdict, ti)

        def canary_step(percent: int) -> Any:
            @task.sensor(task_id=f"canary_{percent}", poke_interval=POKE_SECONDS,
                         timeout=STAGE_TIMEOUT.total_seconds(), mode="reschedule")  # fmt: skip
            def canary(plan: dict, chosen: dict, deployed: dict, dag_run=None, ti=None) -> PokeReturnValue:
                """A canary step: the candidate answers this share of request ids for the bake time."""
                run = runtime.run_plan(plan)
                server, ssm, cloudwatch, region = _targets(run)
                fault = (dag_run.conf or {}).get("release_fault") if dag_run else None
                verdict = release_run.canary_poke(
                    run, chosen, deployed, percent, server=server, ssm=ssm, cloudwatch=cloudwatch, region=region,
                    fault=fault,
                )  # fmt: skip
                return _stage_result(f"canary_{percent}", verdict, ti)

            return canary

        @task(task_id="complete", pool=ALIASES_POOL, outlets=[assets.CHAMPION, assets.SERVED_MODEL])
        def complete(plan: dict, chosen: dict, deployed: dict, evaluation: dict, ti=None, outlet_events=None) -> dict:
            """Every stage passed: champion -> candidate (compare-and-swap), 100 % on every target."""
            run = runtime.run_plan(plan)
            server, ssm, _, region = _targets(run)
            stages = {t: ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}") for t in stage_ids}
            with runtime.failures(run):  # another run moved champion meanwhile: fail (no retry), then abort
                done = release_run.complete(
                    run, runtime.store(run), chosen, deployed, stages, server=server, ssm=ssm, region=region,
                    evaluation=evaluation,
                )  # fmt: skip
            from tasks import pipeline

            outlet_events[assets.CHAMPION].extra = pipeline.champion_event(run, done, evaluation)
            outlet_events[assets.SERVED_MODEL].extra = {
                "model_name": run.model_name, "model_version": chosen["candidate_version"],
                "targets": deployed["targets"], "endpoint": (deployed.get("local") or {}).get("url"),
            }  # fmt: skip
            return done

        @task(task_id="abort", trigger_rule=TriggerRule.ONE_FAILED)
        def abort(plan: dict, run_id=None, ti=None) -> dict:
            """A stage failed: weight 0 on every target, the baseline serves, champion untouched; logged, alerted."""
            chosen, deployed = (ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}") for t in ("candidate", "deploy_candidate"))
            if chosen is None:  # the run failed before the release: nothing to abort (its own failure stands)
                from airflow.sdk.exceptions import AirflowSkipException

                raise AirflowSkipException("no release candidate: nothing was deployed, nothing to abort")
            run = runtime.run_plan(plan)
            stage, verdict = release_run.first_abort(
                [ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}", key="abort_verdict") for t in stage_ids]
            )
            server, ssm, _, region = _targets(run)
            outcome = release_run.abort(
                run, runtime.store(run), chosen, deployed, stage, verdict, server=server, ssm=ssm, region=region,
                evaluation=ti.xcom_pull(task_ids=evaluation_task_id),
            )  # fmt: skip
            alerts.send({"event": "release_aborted", "text": f"{run.model_name} v{chosen['candidate_version']}: "
                         f"{'; '.join(outcome['reasons'])}", "dag_run_id": run_id, **outcome})  # fmt: skip
            return outcome

        @task(task_id="outcome", trigger_rule=TriggerRule.ALL_DONE)
        def outcome(plan: dict, evaluation: dict, run_id=None, ti=None) -> dict:
            """What became of the candidate: completed, aborted (the run fails), or not released (approval)."""
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            pulled = (ti.xcom_pull(task_ids=f"{GROUP_ID}.{t}") for t in ("candidate", "complete", "abort"))
            kind, value = release_run.outcome_of(*pulled, ti.xcom_pull(task_ids=f"{GROUP_ID}.approve_release"))
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
