"""The champion/challenger promotion gate: an explicit rule, a decision and its reasons.

The rule lives in ``include/training.yaml`` (``gate:``) and is applied to the test-split
metrics of both models. Every decision carries human-readable reasons with the numbers
behind it, so the model card and the promotion log explain why a model was (not) promoted.
An operator may override the rule, but only with a stated reason, and the record keeps
what the rule alone would have decided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc")
FORCE_CHOICES = ("promote", "reject")
# Metrics are computed floats: a challenger exactly at the floor or at champion - tolerance
# must pass even when the subtraction lands one ulp short.
_EPSILON = 1e-9


@dataclass(frozen=True)
class GateRule:
    """Promote when the primary metric clears a floor and does not regress past a tolerance.

    Attributes:
        primary_metric: The metric the rule looks at, one of ``METRICS``.
        floor: Smallest acceptable value of the primary metric, whatever the champion.
        tolerance: How far below the champion the challenger may score and still be promoted
            (a small allowance keeps noise between two equivalent models from blocking retraining).
    """

    primary_metric: str = "roc_auc"
    floor: float = 0.90
    tolerance: float = 0.005

    def __post_init__(self) -> None:
        if self.primary_metric not in METRICS:
            raise ValueError(f"gate primary_metric {self.primary_metric!r} is not one of {list(METRICS)}")
        floor = _as_number(self.floor)
        if floor is None or not 0 <= floor <= 1:
            raise ValueError(f"gate floor must be a number within [0, 1], got {self.floor!r}")
        tolerance = _as_number(self.tolerance)
        if tolerance is None or not tolerance >= 0:
            raise ValueError(f"gate tolerance must be a number >= 0, got {self.tolerance!r}")
        # YAML may give ints (floor: 1); store floats so describe() and reasons format alike.
        object.__setattr__(self, "floor", floor)
        object.__setattr__(self, "tolerance", tolerance)

    def describe(self) -> str:
        """The rule as one sentence, for logs, the model card and the promotion log.

        Returns:
            e.g. ``promote when roc_auc >= 0.900 and roc_auc >= champion's roc_auc - 0.005``.
        """
        metric = self.primary_metric
        return (
            f"promote when {metric} >= {_param(self.floor)} "
            f"and {metric} >= champion's {metric} - {_param(self.tolerance)}"
        )


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why.

    Attributes:
        promote: Whether the challenger becomes the champion.
        reasons: Human sentences with the numbers behind the decision, in order.
        forced: The decision was imposed by an operator, not by the rule.
        rule: ``GateRule.describe()`` of the rule that was applied.
    """

    promote: bool
    reasons: tuple[str, ...]
    forced: bool = False
    rule: str = ""

    @property
    def decision(self) -> str:
        """One of ``promote``, ``reject``, ``forced_promote``, ``forced_reject``."""
        outcome = "promote" if self.promote else "reject"
        return f"forced_{outcome}" if self.forced else outcome

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, logged next to the model card.

        Returns:
            decision, promote, forced, reasons (a list) and rule.
        """
        return {
            "decision": self.decision,
            "promote": self.promote,
            "forced": self.forced,
            "reasons": list(self.reasons),
            "rule": self.rule,
        }


def decide(
    rule: GateRule,
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    force: str | None = None,
    force_reason: str | None = None,
) -> GateDecision:
    """Apply the promotion rule to test-split metrics, or record an operator's override.

    The challenger's primary metric must be a finite number >= ``rule.floor`` and, when a
    champion with a usable primary metric exists, >= champion - ``rule.tolerance``. The first
    model (no champion) and a challenger facing a champion whose metric is missing or NaN
    only need the floor.

    Args:
        rule: The promotion rule.
        challenger: Test metrics of the newly trained model.
        champion: Test metrics of the serving model on the same split; None when there is none yet.
        force: ``promote`` or ``reject`` to override the rule; None (or blank, as a cleared
            form field arrives) to apply it.
        force_reason: Why the rule is overridden; required with ``force``.

    Returns:
        The decision with its reasons. When forced, the first reason names the override and
        the operator's reason, the second what the rule alone would have decided.

    Raises:
        ValueError: ``force`` is not ``promote``/``reject``, or ``force`` lacks a ``force_reason``.
    """
    if isinstance(force, str) and not force.strip():
        force = None
    if force is not None and force not in FORCE_CHOICES:
        raise ValueError(f"force must be one of {list(FORCE_CHOICES)} or None, got {force!r}")
    if force is not None and not (force_reason or "").strip():
        raise ValueError("forcing a gate decision needs force_reason")

    promote, reasons = _apply_rule(rule, challenger, champion)
    if force is None:
        return GateDecision(promote=promote, reasons=tuple(reasons), forced=False, rule=rule.describe())
    rule_outcome = "promote" if promote else "reject"
    return GateDecision(
        promote=force == "promote",
        reasons=(
            f"FORCED {force} by operator: {force_reason.strip()}",
            f"rule alone would have: {rule_outcome} ({'; '.join(reasons)})",
        ),
        forced=True,
        rule=rule.describe(),
    )


def _apply_rule(
    rule: GateRule, challenger: Mapping[str, float], champion: Mapping[str, float] | None
) -> tuple[bool, list[str]]:
    metric = rule.primary_metric
    value = _as_number(challenger.get(metric))
    if value is None or not math.isfinite(value):
        shown = "missing" if challenger.get(metric) is None else repr(challenger.get(metric))
        return False, [f"challenger's {metric} is {shown}: a model without a usable {metric} cannot be promoted"]

    reasons = []
    above_floor = value >= rule.floor - _EPSILON
    if above_floor:
        reasons.append(f"{metric} {value:.4f} >= floor {rule.floor:.4f}")
    else:
        reasons.append(f"{metric} {value:.4f} is below the floor {rule.floor:.4f}")

    if champion is None:
        reasons.append("no champion yet: the first model only needs the floor")
        return above_floor, reasons
    champion_value = _as_number(champion.get(metric))
    if champion_value is None or not math.isfinite(champion_value):
        shown = "missing" if champion.get(metric) is None else repr(champion.get(metric))
        reasons.append(f"champion's {metric} is {shown} (unusable): the challenger only needs the floor")
        return above_floor, reasons

    gap = champion_value - value
    within_tolerance = value >= champion_value - rule.tolerance - _EPSILON
    if gap <= 0:
        reasons.append(f"{metric} {value:.4f} >= the champion's {champion_value:.4f}")
    elif within_tolerance:
        reasons.append(
            f"{metric} {value:.4f} is {gap:.4f} below the champion's {champion_value:.4f}, "
            f"within tolerance {rule.tolerance:.4f}"
        )
    else:
        reasons.append(
            f"{metric} {value:.4f} is {gap:.4f} below the champion's {champion_value:.4f} "
            f"(tolerance {rule.tolerance:.4f})"
        )
    return above_floor and within_tolerance, reasons


def _as_number(value: Any) -> float | None:
    """``value`` as a float, or None when it is absent or not a number (bools are not metrics)."""
    if value is None or isinstance(value, bool | str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _param(value: float) -> str:
    # Three decimals read well (0.900, 0.005) but must not round a finer setting away (0.0025).
    short = f"{value:.3f}"
    return short if float(short) == value else f"{value:.6g}"
