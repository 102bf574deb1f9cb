"""A release on live evidence: the settings of each stage and the verdict of each stage from live metrics.

After the gate, a challenger is a *candidate*, not a champion. The release then runs:

* ``approval`` (``auto`` | ``manual``): manual puts a human-in-the-loop approval before anything ships;
* ``shadow``: the candidate scores mirrored traffic beside the baseline (callers get the baseline's
  answer); it passes when agreement, the score PSI between the two and the candidate's p99 stay within
  thresholds once ``min_requests`` rows were shadowed, or decides ``on_insufficient_traffic`` after
  ``max_minutes``;
* ``canary``: the candidate answers a growing share of request ids (``steps``, percent), each step baked
  ``bake_seconds``; the candidate's 5xx rate, p99 and score distribution (PSI against the baseline's)
  are judged during the bake, and the first breach aborts;
* completion moves ``champion`` (compare-and-swap, ``tasks.registry.promote``); an abort sets the
  weight back to 0 everywhere and leaves ``champion`` untouched.

Every verdict here is a plain function of the release report the target returned (the serving app's
``GET /admin/models/{name}/release``, or CloudWatch alarm states on EC2) and of the clock, so the
sensors of the DAG only fetch and ask.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.deploy import DEPLOY_CONFIG

PASS, ABORT, WAIT, SKIPPED = "pass", "abort", "wait", "skipped"
PROCEED_INSUFFICIENT = "proceed_insufficient_traffic"
APPROVAL_MODES = ("auto", "manual")
INSUFFICIENT_TRAFFIC = ("proceed", "abort")
# PSI of two histograms with an empty bin is infinite; a small floor keeps it finite and comparable.
PSI_EPSILON = 1e-4


class ReleaseAborted(RuntimeError):
    """A stage's verdict was ``abort``: the release is rolled back (weight 0), champion untouched."""

    def __init__(self, stage: str, verdict: Mapping[str, Any]) -> None:
        self.stage, self.verdict = stage, dict(verdict)
        super().__init__(f"release aborted at {stage}: {'; '.join(verdict.get('reasons') or ['no reason given'])}")


@dataclass(frozen=True)
class ShadowThresholds:
    min_agreement: float = 0.95
    max_score_psi: float = 0.1
    max_p99_ms: float = 250.0


@dataclass(frozen=True)
class ShadowConfig:
    enabled: bool = True
    min_requests: int = 200
    max_minutes: float = 10.0
    thresholds: ShadowThresholds = field(default_factory=ShadowThresholds)
    on_insufficient_traffic: str = "proceed"

    def __post_init__(self) -> None:
        _check_insufficient("shadow", self.on_insufficient_traffic)
        if self.min_requests < 1 or self.max_minutes <= 0:
            raise ValueError("shadow.min_requests must be >= 1 and shadow.max_minutes > 0")
        t = self.thresholds
        if not 0 <= t.min_agreement <= 1 or t.max_score_psi < 0 or t.max_p99_ms <= 0:
            raise ValueError(
                f"shadow.thresholds: agreement within [0, 1], max_score_psi >= 0, max_p99_ms > 0; got {asdict(t)}"
            )


@dataclass(frozen=True)
class CanaryThresholds:
    max_5xx_rate: float = 0.001
    max_p99_ms: float = 250.0
    max_score_psi: float = 0.2


@dataclass(frozen=True)
class CanaryConfig:
    enabled: bool = True
    steps: tuple[int, ...] = (10, 50, 100)
    bake_seconds: float = 300.0
    min_requests: int = 50
    thresholds: CanaryThresholds = field(default_factory=CanaryThresholds)
    on_insufficient_traffic: str = "proceed"

    def __post_init__(self) -> None:
        _check_insufficient("canary", self.on_insufficient_traffic)
        steps = list(self.steps)
        if not steps or steps != sorted(set(steps)) or steps[0] <= 0 or steps[-1] != 100:
            raise ValueError(f"canary.steps must rise strictly from above 0 to 100 (percent), got {steps}")
        if self.bake_seconds < 0 or self.min_requests < 1:
            raise ValueError("canary.bake_seconds must be >= 0 and canary.min_requests >= 1")
        t = self.thresholds
        if not 0 <= t.max_5xx_rate <= 1 or t.max_p99_ms <= 0 or t.max_score_psi < 0:
            raise ValueError(
                f"canary.thresholds: max_5xx_rate within [0, 1], max_p99_ms > 0, max_score_psi >= 0; got {asdict(t)}"
            )


@dataclass(frozen=True)
class ApprovalConfig:
    """``default`` for every dataset, ``datasets`` overrides it per dataset; ``timeout_minutes`` bounds the wait."""

    default: str = "auto"
    datasets: dict[str, str] = field(default_factory=dict)
    timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        for where, mode in [("default", self.default), *self.datasets.items()]:
            if mode not in APPROVAL_MODES:
                raise ValueError(f"approval {where}: expected auto or manual, got {mode!r}")
        if self.timeout_minutes <= 0:
            raise ValueError("approval.timeout_minutes must be > 0")

    def mode_for(self, dataset: str) -> str:
        return self.datasets.get(dataset, self.default)


@dataclass(frozen=True)
class ReleaseConfig:
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)


def _check_insufficient(stage: str, value: str) -> None:
    if value not in INSUFFICIENT_TRAFFIC:
        raise ValueError(f"{stage}.on_insufficient_traffic must be proceed or abort, got {value!r}")


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
    return dict(value)


def parse_release_config(raw: Mapping[str, Any], source: str = "deploy config") -> ReleaseConfig:
    """The release sections (``approval``, ``shadow``, ``canary``) of the deploy config.

    ``approval`` is ``auto`` | ``manual``, or a mapping ``{default, datasets: {name: mode}, timeout_minutes}``.
    A bad value fails naming the file, the key and what is allowed.
    """
    try:
        approval = raw.get("approval", "auto")
        approval = ApprovalConfig(default=approval) if isinstance(approval, str) else ApprovalConfig(**approval)
        shadow = _section(raw, "shadow")
        shadow["thresholds"] = ShadowThresholds(**_section(shadow, "thresholds"))
        canary = _section(raw, "canary")
        canary["thresholds"] = CanaryThresholds(**_section(canary, "thresholds"))
        if "steps" in canary:
            canary["steps"] = tuple(int(step) for step in canary["steps"])
        release = _section(raw, "release")
        return ReleaseConfig(approval=approval, shadow=ShadowConfig(**shadow), canary=CanaryConfig(**canary), **release)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def load_release_config(path: Path = DEPLOY_CONFIG) -> ReleaseConfig:
    return parse_release_config(yaml.safe_load(path.read_text()) or {}, str(path))


# --- verdicts -------------------------------------------------------------------------------


def score_psi(expected: Sequence[float], actual: Sequence[float]) -> float | None:
    """PSI between two score histograms over the same bins (None when either side is empty).

    Hand-written on purpose: the serving app exports binned counts per role, not the scores, and
    Evidently's PSI wants the raw columns. Same formula: sum((a - e) * ln(a / e)) over bin shares.
    """
    total_e, total_a = float(sum(expected)), float(sum(actual))
    if total_e <= 0 or total_a <= 0 or len(expected) != len(actual):
        return None
    psi = 0.0
    for e, a in zip(expected, actual, strict=True):
        share_e, share_a = max(e / total_e, PSI_EPSILON), max(a / total_a, PSI_EPSILON)
        psi += (share_a - share_e) * math.log(share_a / share_e)
    return round(psi, 6)


def elapsed_seconds(report: Mapping[str, Any], now: dt.datetime) -> float:
    """Seconds since the release (or its current canary step) started, as the target says."""
    started = report.get("started_at")
    if not started:
        return 0.0
    return max(0.0, (now - dt.datetime.fromisoformat(started)).total_seconds())


def verdict(status: str, reasons: Iterable[str], metrics: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return {"status": status, "reasons": list(reasons), "metrics": dict(metrics), **extra}


def _insufficient(stage: str, policy: str, seen: int, needed: int, waited: float, metrics: Mapping) -> dict:
    reason = f"{stage}: only {seen} of {needed} requests arrived in {waited:.0f} s"
    if policy == "abort":
        return verdict(ABORT, [f"{reason} (on_insufficient_traffic: abort)"], metrics, insufficient_traffic=True)
    return verdict(
        PROCEED_INSUFFICIENT, [f"{reason}; proceeding (on_insufficient_traffic: proceed)"], metrics,
        insufficient_traffic=True,
    )  # fmt: skip


def expects_new_behaviour(trigger: Mapping[str, Any]) -> bool:
    """Whether the run retrains on labels that show the baseline wrong (a quality signal): the candidate is
    *meant* to disagree with the baseline, so agreement and score PSI against it judge nothing; errors,
    latency and (canary) the 5xx rate still do. Its evidence is the labelled holdout and the next quality check."""
    return "quality" in (trigger.get("signals") or [])


def shadow_verdict(
    report: Mapping[str, Any], config: ShadowConfig, now: dt.datetime, *, new_behaviour: bool = False
) -> dict[str, Any]:
    """The shadow stage from the release report: ``wait``, ``pass``, ``abort`` or proceed on too little traffic.

    ``new_behaviour`` (:func:`expects_new_behaviour`): agreement and score PSI are recorded, not judged.
    """
    shadow = report.get("shadow") or {}
    roles = report.get("roles") or {}
    rows = int(shadow.get("rows") or 0)
    failed = int(shadow.get("failed_rows") or 0)
    psi = score_psi(
        (roles.get("baseline") or {}).get("score_histogram") or [],
        (roles.get("candidate") or {}).get("score_histogram") or [],
    )
    waited = elapsed_seconds(report, now)
    metrics = {
        "shadowed_rows": rows,
        "failed_rows": failed,
        "agreement": shadow.get("agreement_rate"),
        "score_psi": psi,
        "candidate_p99_ms": shadow.get("candidate_p99_ms"),
        "seconds": round(waited, 1),
    }
    if report.get("state") != "running" or report.get("mode") != "shadow":
        return verdict(ABORT, [f"the target runs no shadow release (state {report.get('state')!r})"], metrics)
    if rows + failed < config.min_requests:
        if waited < config.max_minutes * 60:
            return verdict(WAIT, [f"{rows + failed} of {config.min_requests} requests shadowed"], metrics)
        return _insufficient("shadow", config.on_insufficient_traffic, rows + failed, config.min_requests, waited,
                             metrics)  # fmt: skip
    t = config.thresholds
    reasons = []
    agreement = shadow.get("agreement_rate")
    if failed:
        reasons.append(f"the candidate failed on {failed} shadowed rows")
    if not new_behaviour and (agreement is None or agreement < t.min_agreement):
        reasons.append(f"agreement {agreement} below {t.min_agreement}")
    if not new_behaviour and psi is not None and psi > t.max_score_psi:
        reasons.append(f"score PSI {psi:.4f} above {t.max_score_psi}")
    p99 = shadow.get("candidate_p99_ms")
    if p99 is not None and p99 > t.max_p99_ms:
        reasons.append(f"candidate p99 {p99} ms above {t.max_p99_ms} ms")
    if reasons:
        return verdict(ABORT, reasons, metrics)
    unjudged = " (not judged: retrained on labels that show the baseline wrong)" if new_behaviour else ""
    return verdict(PASS, [f"agreement {agreement}, score PSI {psi}{unjudged}, p99 {p99} ms on {rows} rows"], metrics)


def canary_verdict(
    report: Mapping[str, Any], config: CanaryConfig, weight: float, now: dt.datetime, *, new_behaviour: bool = False
) -> dict[str, Any]:
    """One canary step from the release report: abort at the first breach, pass after the bake.

    ``new_behaviour`` (:func:`expects_new_behaviour`): the score PSI against the baseline is recorded, not judged.
    """
    roles = report.get("roles") or {}
    candidate, baseline = roles.get("candidate") or {}, roles.get("baseline") or {}
    requests = int(candidate.get("requests") or 0)
    waited = elapsed_seconds(report, now)
    psi = score_psi(baseline.get("score_histogram") or [], candidate.get("score_histogram") or [])
    metrics = {
        "weight": weight,
        "candidate_requests": requests,
        "candidate_5xx": int(candidate.get("errors_5xx") or 0),
        "candidate_5xx_rate": candidate.get("error_rate"),
        "candidate_p99_ms": candidate.get("p99_ms"),
        "baseline_requests": int(baseline.get("requests") or 0),
        "baseline_5xx_rate": baseline.get("error_rate"),
        "baseline_p99_ms": baseline.get("p99_ms"),
        "score_psi": psi,
        "seconds": round(waited, 1),
    }
    running = report.get("state") == "running" and report.get("mode") == "canary"
    if not running or not math.isclose(float(report.get("weight") or 0), weight):
        return verdict(ABORT, [f"the target runs no canary at weight {weight} (state {report.get('state')!r})"],
                       metrics)  # fmt: skip
    t = config.thresholds
    reasons = []
    if requests >= config.min_requests:
        rate = float(candidate.get("error_rate") or 0)
        if rate > t.max_5xx_rate:
            reasons.append(f"5xx rate {rate:.4f} above {t.max_5xx_rate} ({metrics['candidate_5xx']} of {requests})")
        p99 = candidate.get("p99_ms")
        if p99 is not None and p99 > t.max_p99_ms:
            reasons.append(f"p99 {p99} ms above {t.max_p99_ms} ms")
        judged = not new_behaviour and psi is not None and metrics["baseline_requests"] >= config.min_requests
        if judged and psi > t.max_score_psi:
            reasons.append(f"score PSI {psi:.4f} against the baseline above {t.max_score_psi}")
    if reasons:
        return verdict(ABORT, reasons, metrics)
    if waited < config.bake_seconds:
        return verdict(WAIT, [f"baking {waited:.0f} of {config.bake_seconds:.0f} s"], metrics)
    if requests < config.min_requests:
        return _insufficient(f"canary {weight:.0%}", config.on_insufficient_traffic, requests, config.min_requests,
                             waited, metrics)  # fmt: skip
    return verdict(PASS, [f"{requests} requests, 5xx rate {candidate.get('error_rate')}, p99 "
                          f"{candidate.get('p99_ms')} ms, score PSI {psi}"], metrics)  # fmt: skip


def alarm_verdict(alarms: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """An abort when any CloudWatch alarm of the release is in ALARM (its reason recorded), else None."""
    firing = [a for a in alarms if a.get("StateValue") == "ALARM"]
    if not firing:
        return None
    reasons = [f"CloudWatch alarm {a['AlarmName']} in ALARM: {a.get('StateReason', '')}".strip() for a in firing]
    return verdict(ABORT, reasons, {"alarms": {a["AlarmName"]: a.get("StateValue") for a in alarms}})


def combine(local: Mapping[str, Any] | None, alarms: Mapping[str, Any] | None) -> dict[str, Any]:
    """One verdict from the targets' (an abort anywhere wins; then waiting; then the local one)."""
    verdicts = [v for v in (alarms, local) if v]
    for status in (ABORT, WAIT):
        for one in verdicts:
            if one["status"] == status:
                return dict(one)
    return dict(verdicts[-1]) if verdicts else verdict(PASS, ["no target to judge"], {})


def done(stage_verdict: Mapping[str, Any]) -> bool:
    return stage_verdict["status"] != WAIT


def stage_skipped(reason: str) -> dict[str, Any]:
    return verdict(SKIPPED, [reason], {})


# --- approval ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalDecision:
    approved: bool
    outcome: str  # approved | rejected | timed_out | not_required
    reason: str


def approval_decision(response: Mapping[str, Any] | None, *, required: bool) -> ApprovalDecision:
    """What the approval task's answer means: approved, rejected by someone, or timed out (no one answered).

    ``response`` is the approval operator's XCom (``chosen_options``, ``responded_by_user``, ...),
    None when it never returned (skipped, failed on a timeout without default).
    """
    if not required:
        return ApprovalDecision(True, "not_required", "approval: auto")
    if not response:
        return ApprovalDecision(False, "timed_out", "no approval was recorded before the timeout")
    chosen = list(response.get("chosen_options") or [])
    user = response.get("responded_by_user")
    who = (user or {}).get("name") or (user or {}).get("id") if isinstance(user, Mapping) else user
    if chosen == ["Approve"]:
        return ApprovalDecision(True, "approved", f"approved by {who or 'an operator'}")
    if not who:
        return ApprovalDecision(False, "timed_out", "no one answered before the timeout (default: Reject)")
    return ApprovalDecision(False, "rejected", f"rejected by {who}")


def approval_prompt(evaluation: Mapping[str, Any], model_card_url: str) -> str:
    """The approval's body: the gate's decision and metrics, and where the model card is."""
    metric = evaluation.get("primary_metric", "")
    challenger = (evaluation.get("challenger_metrics") or {}).get(metric)
    champion = (evaluation.get("champion_metrics") or {}).get(metric)
    lines = [
        f"Release v{evaluation.get('challenger_version')} (champion v{evaluation.get('champion_version')})?",
        "",
        f"Gate: {evaluation.get('decision')} on {metric}: challenger {challenger}, champion {champion}.",
        *[f"- {reason}" for reason in evaluation.get("reasons") or []],
        "",
        f"Model card: {model_card_url}",
    ]
    return "\n".join(lines)
