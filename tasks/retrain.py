"""The retrain rule: when the evidence calls for a training run, and when storm protection holds it back.

Each kind of evidence that the served model should be retrained is a :class:`Signal`: today
``drift`` (PSI of what the model sees, ``tasks.drift.drift_signal``); live quality from
delayed labels is another value of the same type, not another code path. Every signal
shares one rule, applied by :func:`decide` in this order:

1. a signal is *ready* when it fired in ``consecutive`` checks in a row (its own history);
2. none fired: no run; some fired but none is ready yet: pending;
3. one training run at a time: a queued or running training run holds every signal back;
4. one cooldown for every reason: after any triggered retrain, ``cooldown`` must pass;
5. nothing labelled to train on: no run;
6. otherwise exactly one run, whose id derives from the dataset and the deciding check's
   window end (a retried trigger finds it and creates nothing) and whose conf names every
   ready signal with its reason and evidence.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Outcomes recorded with every check (the drift_check table's ``decision``).
RETRAIN = "retrain"
TRAINING_ACTIVE = "training_active"
COOLDOWN = "cooldown"
NO_LABELLED_DATA = "no_labelled_data"


@dataclass(frozen=True)
class Signal:
    """One kind of evidence, as seen by the current check.

    Attributes:
        kind: What it measures (``drift``, ``quality``); names the run id and the outcomes.
        fired: This check is past the signal's threshold.
        history: ``fired`` of the same signal in the previous checks, newest first.
        consecutive: Checks in a row that must fire before it counts (K).
        reason: Why it fired, in words (recorded on the training run).
        evidence: Run conf fields this signal contributes (e.g. ``drift_report_uri``, ``max_psi``).
    """

    kind: str
    fired: bool
    history: tuple[bool, ...] = ()
    consecutive: int = 1
    reason: str = ""
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kind.isidentifier():
            raise ValueError(f"signal kind must be a plain name, got {self.kind!r}")
        if self.consecutive < 1:
            raise ValueError(f"consecutive must be at least 1, got {self.consecutive}")

    @property
    def streak(self) -> int:
        """Checks in a row that fired, this one included (counted up to ``consecutive``)."""
        if not self.fired:
            return 0
        streak = 1
        for fired in self.history:
            if not fired or streak >= self.consecutive:
                break
            streak += 1
        return streak

    @property
    def ready(self) -> bool:
        return self.fired and self.streak >= self.consecutive


@dataclass(frozen=True)
class StormGuard:
    """What holds a ready signal back.

    Attributes:
        active_training_runs: Training runs of the dataset queued or running now.
        last_retrain_at: Window end of the check that last triggered a retrain, for any reason.
        cooldown: Quiet time after a triggered retrain.
    """

    active_training_runs: int = 0
    last_retrain_at: dt.datetime | None = None
    cooldown: dt.timedelta = dt.timedelta(0)


@dataclass(frozen=True)
class Decision:
    """What the rule decided; ``run_id`` and ``conf`` only when it triggers a training run."""

    trigger: bool
    outcome: str
    reason: str
    signals: tuple[str, ...] = ()
    run_id: str | None = None
    conf: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values (XCom): ``retrain`` holds ``run_id`` and ``conf`` when triggering, else None."""
        return {
            "trigger": self.trigger,
            "outcome": self.outcome,
            "reason": self.reason,
            "signals": list(self.signals),
            "retrain": {"run_id": self.run_id, "conf": self.conf} if self.trigger else None,
        }


def skip_reason(decision: Mapping[str, Any], *, triggers: bool) -> str | None:
    """Why the branch task that triggers the training run (``triggers``), or the one that does not, skips itself.

    ``decision``: ``tasks.drift.decision_xcom``; None: the task runs. Each branch skips itself, since a
    branch in a mapped task group does not skip the other branch's task instance in Airflow 3.3.2.
    """
    if bool(decision["trigger"]) == triggers:
        return None
    if triggers:
        return f"{decision['dataset']}: no retraining ({decision['outcome']}: {decision['reason']})"
    return f"{decision['dataset']}: training run {decision['retrain']['run_id']} triggered"


def run_id(kinds: Sequence[str], dataset: str, window_end: dt.datetime) -> str:
    """One training run per deciding check: ``drift__<dataset>__<window end, UTC>`` (``drift+quality__...``)."""
    prefix = "+".join(sorted(set(kinds)))
    return f"{prefix}__{dataset}__{window_end.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%S}"


def decide(
    signals: Sequence[Signal],
    *,
    dataset: str,
    window_end: dt.datetime,
    guard: StormGuard,
    labelled_day: str | None,
    window_days: int = 1,
) -> Decision:
    """Apply the retrain rule to this check's signals.

    Args:
        signals: The evidence of this check (at least one).
        dataset: Dataset of the model (names the run and goes into its conf).
        window_end: End of the window this check looked at (the run id's time).
        guard: Active runs, the last triggered retrain and the cooldown.
        labelled_day: Newest day with labelled data on or before the window (the run's ``ds``).
        window_days: Days of data the triggered run trains on.

    Returns:
        The decision; when it triggers, the run id and conf of the one training run.
    """
    if not signals:
        raise ValueError("decide needs at least one signal")
    kinds = [s.kind for s in signals]
    label = kinds[0] if len(kinds) == 1 else "signal"
    fired = [s for s in signals if s.fired]
    ready = [s for s in signals if s.ready]
    if not fired:
        return Decision(False, f"no_{label}", f"no {' or '.join(kinds)} at or above its threshold")
    if not ready:
        progress = ", ".join(f"{s.kind} in {s.streak} of the {s.consecutive} consecutive checks" for s in fired)
        return Decision(False, f"{label}_pending", progress, tuple(s.kind for s in fired))
    names = tuple(s.kind for s in ready)
    if guard.active_training_runs:
        return Decision(
            False,
            TRAINING_ACTIVE,
            f"{guard.active_training_runs} training run(s) queued or running: not triggering another",
            names,
        )
    if guard.last_retrain_at is not None and window_end - guard.last_retrain_at < guard.cooldown:
        until = guard.last_retrain_at + guard.cooldown
        return Decision(
            False,
            COOLDOWN,
            f"cooldown after the retrain triggered at {guard.last_retrain_at:%Y-%m-%dT%H:%M}Z, "
            f"until {until:%Y-%m-%dT%H:%M}Z",
            names,
        )
    if labelled_day is None:
        return Decision(False, NO_LABELLED_DATA, f"{' and '.join(names)}, but no labelled drop to retrain on", names)
    evidence: dict[str, Any] = {}
    for signal in ready:
        evidence.update(signal.evidence)
    conf = {
        "ds": labelled_day,
        "dataset": dataset,
        "window_days": window_days,
        "reason": "; ".join(s.reason or s.kind for s in ready),
        "signals": list(names),
        **evidence,
    }
    streaks = ", ".join(f"{s.kind} in {s.streak} consecutive check(s)" for s in ready)
    return Decision(True, RETRAIN, streaks, names, run_id(names, dataset, window_end), conf)
