"""The release stages of a training run, as functions of the plan, the candidate and the targets' clients.

``candidate`` (the gate passed: a candidate, not a champion) → ``deploy_candidate`` (the candidate
beside the baseline on every target, no traffic) → ``shadow_poke`` / ``canary_poke`` (each call
drives the target to the stage's routing, idempotently, and returns the stage's verdict from the
live metrics) → ``complete`` (``champion`` moved by compare-and-swap, the candidate serves 100 %)
or ``abort`` (weight 0 everywhere, the baseline serves, champion untouched, everything logged).

The local target is the model server's release API; the EC2 target is ``rollout.sh`` over SSM
(awaited) and the release's CloudWatch alarms. The verdicts are ``tasks.release``'s.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks import delivery, deploy, monitoring_store, registry, release

if TYPE_CHECKING:
    from tasks.local_server import LocalServer
    from tasks.monitoring_store import Store
    from tasks.plan import RunPlan

log = logging.getLogger(__name__)


class ReleaseTargetFailed(deploy.DeployFailed):
    """A target did not do what the release asked (an SSM command failed, the server refused)."""


class ReleaseStopped(RuntimeError):
    """The release aborted (rolled back) or stopped before completing: the run fails, a retry cannot help."""


def candidate(plan: RunPlan, store: Store, evaluation: Mapping[str, Any], dag_run_id: str) -> dict[str, Any]:
    """The gate passed: the challenger is the release's candidate; ``baseline_version`` is the champion the
    run read (the compare-and-swap's expected value when ``champion`` moves at the end). The gate's
    decision goes to the promotion log now; the release's end overwrites it (``release_aborted``, ...)."""
    from tasks.pipeline import record_decision

    record_decision(plan, store, evaluation, dag_run_id)
    info = registry.release_info(
        tracking_uri=plan.settings.mlflow_tracking_uri, model_name=plan.model_name, alias="challenger"
    )
    config = release.load_release_config()
    return {
        **info,
        "candidate_version": evaluation["challenger_version"],
        "baseline_version": evaluation["champion_version"],
        "first_release": evaluation["champion_version"] is None,
        "approval": config.approval.mode_for(plan.dataset),
        "approval_prompt": release.approval_prompt(evaluation, f"{evaluation.get('mlflow_run_url', '')}/artifacts"),
        "dag_run_id": dag_run_id,
    }


def candidate_release(chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate as a release of ``tasks.delivery`` (its ``model_version`` is the candidate's)."""
    return {**chosen, "model_version": chosen["candidate_version"]}


def publish_candidate(ecr: Any, chosen: Mapping[str, Any] | None, registry_login: Any = None) -> dict[str, Any]:
    """The candidate's serving image in ECR (scan on push, immutable tag = model version).

    Raises:
        tasks.delivery.NothingReleased: The gate kept the champion, so there is no candidate (the task
            skips, and the release group after it). The task runs all the same: its trigger rule lets
            a skipped approval through, and the run plan it takes is a successful upstream.
    """
    if chosen is None:
        raise delivery.NothingReleased("no candidate: the gate kept the champion, nothing to publish")
    return delivery.publish(ecr, candidate_release(chosen), registry_login)


def ec2_command(
    plan: RunPlan, ssm: Any, fleet: Mapping[str, Any], action: str, version: str, region: str, *, image: str = "",
    arg: str = "",
) -> dict[str, Any]:  # fmt: skip
    """``rollout.sh`` with ``action`` on the model's own fleet over SSM, its real outcome awaited.

    Raises:
        ReleaseTargetFailed: An instance did not report Success.
    """
    commands = deploy.rollout_commands(
        image_uri=image, model_version=version, region=region, config=deploy.load_deploy_config().for_model(plan.model_name).ec2,
        action=action, arg=arg,
    )  # fmt: skip
    sent = deploy.send_and_wait(ssm, fleet["instance_ids"], commands, f"{plan.model_name} {action} v{version} {arg}")
    if not sent["ok"]:
        raise ReleaseTargetFailed(f"SSM {action} of v{version} failed on the fleet: {json.dumps(sent['instances'])}")
    return sent


def deploy_candidate(
    plan: RunPlan,
    chosen: Mapping[str, Any],
    image: Mapping[str, Any],
    *,
    server: LocalServer | None,
    ec2: Any,
    ssm: Any,
    cloudwatch: Any,
    region: str,
) -> dict[str, Any]:
    """The candidate beside the baseline on every target (EC2: idle slot, smoke-tested; no traffic).

    Local: the server runs and serves the baseline (champion). EC2 (``ec2`` given: the plan ships
    there): the tagged fleet, the candidate in its idle slot, smoke-tested there by ``rollout.sh``
    before any traffic; its CloudWatch alarms created.
    """
    fleet = delivery.fleet(plan, ec2, ssm, region, candidate_release(chosen), image) if ec2 is not None else None
    out: dict[str, Any] = {"targets": []}
    version = chosen["candidate_version"]
    if server is not None:
        process = server.ensure_started()
        # The first release has no baseline: the server serves nothing until ``complete`` reloads it.
        served = {"new_version": None} if chosen["first_release"] else server.serve(plan.model_name, plan.dataset)
        out["local"] = {"url": server.url, "process": process, "baseline_version": served["new_version"]}
        out["targets"].append("local")
        if served["new_version"] != chosen["baseline_version"]:
            raise ReleaseTargetFailed(
                f"the local server serves v{served['new_version']}, the run read champion v{chosen['baseline_version']}"
            )
    if fleet is not None:
        sent = ec2_command(plan, ssm, fleet, "stage", version, region, image=image["image_uri"])
        alarms = deploy.ensure_release_alarms(
            cloudwatch, deploy.load_deploy_config().cloudwatch, model_name=plan.model_name, version=version,
            max_5xx_rate=release.load_release_config().canary.thresholds.max_5xx_rate,
        )  # fmt: skip
        out["ec2"] = {"instance_ids": fleet["instance_ids"], "command_id": sent["command_id"], "alarms": alarms}
        out["targets"].append("ec2")
    return out


def _local_release(server: LocalServer, model_name: str, body: dict[str, Any]) -> dict[str, Any]:
    server.admin("POST", f"/admin/models/{model_name}/release", body)  # idempotent for the same body
    return server.admin("GET", f"/admin/models/{model_name}/release")


def shadow_poke(
    plan: RunPlan, chosen: Mapping[str, Any], deployed: Mapping[str, Any], *, server: LocalServer | None,
    ssm: Any, cloudwatch: Any, region: str, now: dt.datetime | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One look at the shadow: mirrored traffic on (idempotent), then the verdict from the live metrics."""
    config = release.load_release_config().shadow
    if not config.enabled:
        return release.stage_skipped("shadow: skipped by configuration (shadow.enabled: false)")
    if chosen["first_release"]:
        return release.stage_skipped("shadow: first release, no baseline to compare with")
    now = now or dt.datetime.now(dt.UTC)
    local = alarms = None
    if "local" in deployed["targets"] and server is not None:
        report = _local_release(server, plan.model_name, {"candidate_version": chosen["candidate_version"],
                                                          "mode": "shadow"})  # fmt: skip
        local = release.shadow_verdict(report, config, now, new_behaviour=release.expects_new_behaviour(plan.trigger))
    if "ec2" in deployed["targets"]:
        # nginx mirrors to the idle slot; the candidate's alarms watch the canary role, judged from the canary on.
        ec2_command(plan, ssm, deployed["ec2"], "mirror", chosen["candidate_version"], region, arg="on")
        if local is None:
            local = release.verdict(release.PASS, ["shadow: mirrored on the fleet (judged locally, if served)"], {})
    return release.combine(local, alarms)


def canary_poke(
    plan: RunPlan, chosen: Mapping[str, Any], deployed: Mapping[str, Any], percent: int, *,
    server: LocalServer | None, ssm: Any, cloudwatch: Any, region: str, fault: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One look at a canary step: the weight set (idempotent), then the verdict from the live metrics.

    ``fault`` ({error_rate, latency_ms}) is passed to the local server's candidate: a deliberate bad
    release for demos and tests, refused unless the server runs with ``FAULT_INJECTION=true``.
    """
    config = release.load_release_config().canary
    if not config.enabled:
        return release.stage_skipped(f"canary {percent} %: skipped by configuration (canary.enabled: false)")
    if chosen["first_release"]:
        return release.stage_skipped(f"canary {percent} %: first release, no baseline to compare with")
    now = now or dt.datetime.now(dt.UTC)
    weight = percent / 100
    local = alarms = None
    if "local" in deployed["targets"] and server is not None:
        body: dict[str, Any] = {"candidate_version": chosen["candidate_version"], "mode": "canary", "weight": weight}
        if fault:
            body["fault"] = dict(fault)
        local = release.canary_verdict(
            _local_release(server, plan.model_name, body), config, weight, now,
            new_behaviour=release.expects_new_behaviour(plan.trigger),
        )  # fmt: skip
    if "ec2" in deployed["targets"]:
        ec2_command(plan, ssm, deployed["ec2"], "weight", chosen["candidate_version"], region, arg=str(percent))
        alarms = release.alarm_verdict(deploy.alarm_states(cloudwatch, deployed["ec2"]["alarms"]))
        if alarms is None and local is None:
            local = release.verdict(release.PASS, [f"canary {percent} %: no CloudWatch alarm in ALARM"], {})
    stage = release.combine(local, alarms)
    return {**stage, "percent": percent}


def stage_poke(
    stage: str, plan: RunPlan, chosen: Mapping[str, Any], deployed: Mapping[str, Any], *, server: LocalServer | None,
    ssm: Any, cloudwatch: Any, region: str, fault: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One look at a stage: ``shadow`` (mirrored traffic scored by the candidate; agreement, score PSI, p99) or
    ``canary_<percent>`` (the candidate answers this share of request ids for the bake time; ``fault`` applies)."""
    clients = {"server": server, "ssm": ssm, "cloudwatch": cloudwatch, "region": region}
    if stage == "shadow":
        return shadow_poke(plan, chosen, deployed, **clients)
    return canary_poke(plan, chosen, deployed, int(stage.removeprefix("canary_")), fault=fault, **clients)


def _rows(chosen: Mapping[str, Any], deployed: Mapping[str, Any], status: str, detail: Mapping[str, Any],
          version: str, action: str) -> list[dict[str, Any]]:  # fmt: skip
    now = monitoring_store.now()
    rows = []
    for target in deployed.get("targets") or []:
        rows.append(
            monitoring_store.deployment_row(
                dag_run_id=chosen["dag_run_id"], action=action, target=target, model_name=chosen["model_name"],
                model_version=version, status=status, detail=json.dumps(detail, sort_keys=True, default=str),
                recorded_at=now, endpoint=(deployed.get("local") or {}).get("url") if target == "local" else None,
                instance_ids=(deployed.get("ec2") or {}).get("instance_ids") if target == "ec2" else None,
            )
        )  # fmt: skip
    return rows


def complete(
    plan: RunPlan, store: Store, chosen: Mapping[str, Any], deployed: Mapping[str, Any], stages: Mapping[str, Any],
    *, server: LocalServer | None, ssm: Any, region: str, evaluation: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Every stage passed: ``champion`` moves (compare-and-swap), then the candidate serves 100 % everywhere."""
    version = chosen["candidate_version"]
    aliases = registry.promote(
        tracking_uri=plan.settings.mlflow_tracking_uri, model_name=plan.model_name, version=version,
        expected_champion=chosen["baseline_version"],
    )  # fmt: skip
    if "local" in deployed["targets"] and server is not None:
        if chosen["first_release"]:
            server.serve(plan.model_name, plan.dataset)  # added beside the other models, at its new champion
        else:
            server.admin("POST", f"/admin/models/{plan.model_name}/release/complete")
    if "ec2" in deployed["targets"]:
        ec2_command(plan, ssm, deployed["ec2"], "complete", version, region)
    outcome = {"outcome": "completed", "stage": "complete", "reasons": [f"v{version} passed every stage"],
               "metrics": dict(stages)}  # fmt: skip
    monitoring_store.write(store, "deployment_log", _rows(chosen, deployed, "deployed", outcome, version, "release"))
    registry.record_release(tracking_uri=plan.settings.mlflow_tracking_uri, run_id=chosen["run_id"], outcome=outcome)
    return {**aliases, **outcome}


def abort(
    plan: RunPlan, store: Store, chosen: Mapping[str, Any], deployed: Mapping[str, Any] | None,
    failed_stage: str, stage_verdict: Mapping[str, Any] | None, *, server: LocalServer | None, ssm: Any, region: str,
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Weight 0 on every target, the baseline serves; champion untouched; the decision and the metrics logged."""
    deployed = deployed or {"targets": []}
    baseline = chosen["baseline_version"]
    results: dict[str, str] = {}
    if "local" in deployed["targets"] and server is not None:
        report = server.admin("POST", f"/admin/models/{plan.model_name}/release/abort")
        results["local"] = f"release {report.get('state')}; v{report.get('baseline_version_now')} serves alone"
    if "ec2" in deployed["targets"]:
        try:
            ec2_command(plan, ssm, deployed["ec2"], "rollback", baseline or "", region)
            results["ec2"] = f"nginx back on the slot serving v{baseline}"
        except ReleaseTargetFailed as err:
            results["ec2"] = f"rollback_failed: {err}"
    verdict = dict(stage_verdict or {})
    outcome = {
        "outcome": "aborted", "stage": failed_stage,
        "reasons": verdict.get("reasons") or [f"{failed_stage} failed"], "metrics": verdict.get("metrics") or {},
        "targets": results,
    }  # fmt: skip
    rows = _rows(chosen, deployed, "rolled_back", outcome, baseline or chosen["candidate_version"], "rollback")
    for row in rows:
        if results.get(row["target"], "").startswith("rollback_failed"):
            row["status"] = "rollback_failed"
    monitoring_store.write(store, "deployment_log", rows)
    if evaluation is not None:
        from tasks.pipeline import record_decision

        logged = {**evaluation, "decision": "release_aborted", "reasons": [*evaluation["reasons"], *outcome["reasons"]]}
        record_decision(plan, store, logged, chosen["dag_run_id"])
    registry.record_release(tracking_uri=plan.settings.mlflow_tracking_uri, run_id=chosen["run_id"], outcome=outcome)
    log.error("release of v%s aborted at %s: %s", chosen["candidate_version"], failed_stage, outcome["reasons"])
    return outcome


def not_released(
    plan: RunPlan, store: Store, evaluation: Mapping[str, Any], decision: release.ApprovalDecision, dag_run_id: str
) -> dict[str, Any]:
    """Rejected or timed-out approval: logged like a gate rejection (promotion log), champion untouched."""
    from tasks.pipeline import record_decision

    logged = {**evaluation, "decision": f"approval_{decision.outcome}",
              "reasons": [*evaluation.get("reasons", []), decision.reason]}  # fmt: skip
    record_decision(plan, store, logged, dag_run_id)
    return {"outcome": decision.outcome, "reason": decision.reason, "champion_version": evaluation["champion_version"]}


def approval_route(chosen: Mapping[str, Any]) -> str:
    """The task after ``route_approval``: a human decides first (``approval: manual``), else straight to the image."""
    return "approve_release" if chosen["approval"] == "manual" else "publish_image"


def outcome_of(
    chosen: Mapping[str, Any] | None,
    completed: Mapping[str, Any] | None,
    aborted: Mapping[str, Any] | None,
    approval_response: Mapping[str, Any] | None,
) -> tuple[str, Any]:
    """What became of the candidate, as ``(kind, value)``.

    ``completed`` (the completion's XCom), ``aborted`` (a message: the run fails), ``no_candidate``
    (the gate kept the champion: skip), ``not_released`` (an :class:`ApprovalDecision`: rejected or
    timed out), ``incomplete`` (approved, yet neither completed nor aborted: a task failed before).
    """
    if completed:
        return "completed", dict(completed)
    if chosen is None:
        return "no_candidate", "no candidate: the gate kept the champion"
    if aborted:
        return "aborted", (
            f"release of v{chosen['candidate_version']} aborted at {aborted['stage']} and rolled back: "
            f"{'; '.join(aborted['reasons'])}; champion v{chosen['baseline_version']} still serves"
        )
    decision = release.approval_decision(approval_response, required=chosen["approval"] == "manual")
    if decision.approved:
        return "incomplete", "the release stopped before completing (see the failed task)"
    return "not_released", decision


def finish(
    plan: RunPlan, store: Store, evaluation: Mapping[str, Any], dag_run_id: str, chosen: Mapping[str, Any] | None,
    completed: Mapping[str, Any] | None, aborted: Mapping[str, Any] | None, approval_response: Mapping[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """What became of the candidate (:func:`outcome_of`): completed, or not released (logged by :func:`not_released`).

    Raises:
        tasks.delivery.NothingReleased: The gate kept the champion (the task skips).
        ReleaseStopped: The release aborted, or stopped before completing (the run fails).
    """
    kind, value = outcome_of(chosen, completed, aborted, approval_response)
    if kind == "no_candidate":
        raise delivery.NothingReleased(value)
    if kind in ("aborted", "incomplete"):
        raise ReleaseStopped(value)
    if kind == "not_released":
        return not_released(plan, store, evaluation, value, dag_run_id)
    return value


def first_abort(verdicts: list[Mapping[str, Any] | None]) -> tuple[str, dict[str, Any] | None]:
    """The stage that aborted and its verdict (reasons, metrics), from the stages' ``abort_verdict`` XComs."""
    verdict = next((dict(v) for v in verdicts if v), None)
    return (verdict["stage"] if verdict else "deploy or complete (see the failed task's log)"), verdict


def completion_events(
    plan: RunPlan,
    done: Mapping[str, Any],
    chosen: Mapping[str, Any],
    deployed: Mapping[str, Any],
    evaluation: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The details of the champion and served-model asset events of a completed release."""
    from tasks.pipeline import champion_event

    served = {
        "model_name": plan.model_name,
        "model_version": chosen["candidate_version"],
        "targets": deployed["targets"],
        "endpoint": (deployed.get("local") or {}).get("url"),
    }
    return champion_event(plan, done, evaluation), served
