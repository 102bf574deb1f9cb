"""The promotion gate: the rule as a table of cases, operator overrides and rule validation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from tasks.gate import METRICS, GateDecision, GateRule, decide

RULE = GateRule(primary_metric="roc_auc", floor=0.90, tolerance=0.005)
NAN = float("nan")


def metrics(roc_auc: float | None = None, **others: float) -> dict[str, float]:
    """A metrics mapping; roc_auc=None leaves the key out, as a broken evaluation would."""
    values = {name: 0.5 for name in METRICS if name != "roc_auc"} | others
    if roc_auc is not None:
        values["roc_auc"] = roc_auc
    return values


@dataclass(frozen=True)
class Case:
    challenger: dict[str, float]
    champion: dict[str, float] | None
    expected: str
    # Substrings that must appear in the reasons (the numbers behind the decision).
    in_reasons: tuple[str, ...]
    rule: GateRule = RULE
    force: str | None = None
    force_reason: str | None = None
    forced: bool = field(default=False)


TABLE = {
    "first model above floor": Case(
        metrics(0.9500), None, "promote", ("roc_auc 0.9500 >= floor 0.9000", "no champion")
    ),
    "first model exactly at the floor": Case(metrics(0.9000), None, "promote", ("roc_auc 0.9000 >= floor 0.9000",)),
    "first model below floor": Case(
        metrics(0.8500), None, "reject", ("roc_auc 0.8500 is below the floor 0.9000", "no champion")
    ),
    "better than champion": Case(
        metrics(0.9800), metrics(0.9712), "promote", ("roc_auc 0.9800 >= the champion's 0.9712",)
    ),
    "slightly worse, within tolerance": Case(
        metrics(0.9690),
        metrics(0.9712),
        "promote",
        ("0.9690 is 0.0022 below the champion's 0.9712", "within tolerance 0.0050"),
    ),
    "exactly at the tolerance boundary": Case(
        metrics(0.9662), metrics(0.9712), "promote", ("0.9662 is 0.0050 below", "within tolerance 0.0050")
    ),
    "worse beyond tolerance": Case(
        metrics(0.9650),
        metrics(0.9712),
        "reject",
        ("roc_auc 0.9650 is 0.0062 below the champion's 0.9712 (tolerance 0.0050)",),
    ),
    "above champion but below floor": Case(
        metrics(0.8900),
        metrics(0.8500),
        "reject",
        ("roc_auc 0.8900 is below the floor 0.9000", "roc_auc 0.8900 >= the champion's 0.8500"),
    ),
    "NaN challenger metric": Case(metrics(NAN), metrics(0.9712), "reject", ("challenger's roc_auc is nan",)),
    "missing challenger metric": Case(metrics(None), None, "reject", ("challenger's roc_auc is missing",)),
    "None challenger metric": Case({"roc_auc": None}, None, "reject", ("challenger's roc_auc is missing",)),
    "NaN champion metric: floor only": Case(
        metrics(0.9300),
        metrics(NAN),
        "promote",
        ("roc_auc 0.9300 >= floor 0.9000", "champion's roc_auc is nan (unusable)"),
    ),
    "missing champion metric, below floor": Case(
        metrics(0.8000), metrics(None), "reject", ("below the floor", "champion's roc_auc is missing (unusable)")
    ),
    "forced promote of a worse model": Case(
        metrics(0.9000),
        metrics(0.9712),
        "forced_promote",
        (
            "FORCED promote by operator: hotfix for INC-42",
            "rule alone would have: reject",
            "0.9000 is 0.0712 below the champion's 0.9712",
        ),
        force="promote",
        force_reason="hotfix for INC-42",
        forced=True,
    ),
    "forced reject of a better model": Case(
        metrics(0.9900),
        metrics(0.9712),
        "forced_reject",
        ("FORCED reject by operator: label bug in this window", "rule alone would have: promote"),
        force="reject",
        force_reason="label bug in this window",
        forced=True,
    ),
    "f1 as primary metric: f1 passes while roc_auc would fail": Case(
        metrics(0.5000, f1=0.8200),
        metrics(0.9900, f1=0.8000),
        "promote",
        ("f1 0.8200 >= floor 0.8000", "f1 0.8200 >= the champion's 0.8000"),
        rule=GateRule(primary_metric="f1", floor=0.80, tolerance=0.01),
    ),
    "f1 as primary metric: f1 fails while roc_auc would pass": Case(
        metrics(0.9990, f1=0.7000),
        None,
        "reject",
        ("f1 0.7000 is below the floor 0.8000",),
        rule=GateRule(primary_metric="f1", floor=0.80, tolerance=0.01),
    ),
}


@pytest.mark.parametrize("case", TABLE.values(), ids=TABLE.keys())
def test_gate_table(case: Case) -> None:
    decision = decide(case.rule, case.challenger, case.champion, force=case.force, force_reason=case.force_reason)

    assert decision.decision == case.expected, decision.reasons
    assert decision.promote is case.expected.endswith("promote")
    assert decision.forced is case.forced
    assert decision.rule == case.rule.describe()
    joined = " | ".join(decision.reasons)
    for expected in case.in_reasons:
        assert expected in joined


@pytest.mark.parametrize("force", ["promote", "reject"])
def test_forced_reasons_come_first_in_order(force: str) -> None:
    decision = decide(RULE, metrics(0.95), metrics(0.96), force=force, force_reason="  because  ")

    assert decision.reasons[0] == f"FORCED {force} by operator: because"
    assert decision.reasons[1].startswith("rule alone would have: reject (")


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_force_without_reason_is_refused(reason: str | None) -> None:
    with pytest.raises(ValueError, match="forcing a gate decision needs force_reason"):
        decide(RULE, metrics(0.95), None, force="promote", force_reason=reason)


@pytest.mark.parametrize("force", ["yes", "Promote", "skip", True])
def test_unknown_force_value_is_refused(force: object) -> None:
    with pytest.raises(ValueError, match="force must be one of"):
        decide(RULE, metrics(0.95), None, force=force, force_reason="why")  # type: ignore[arg-type]


def test_blank_force_applies_the_rule() -> None:
    # A cleared form field arrives as "", which means "no override", not an unknown value.
    decision = decide(RULE, metrics(0.80), None, force="", force_reason=None)

    assert decision.decision == "reject"
    assert not decision.forced


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"primary_metric": "auc"}, "primary_metric"),
        ({"primary_metric": "log_loss"}, "primary_metric"),
        ({"floor": 1.2}, "floor"),
        ({"floor": -0.1}, "floor"),
        ({"floor": NAN}, "floor"),
        ({"floor": "0.9"}, "floor"),
        ({"tolerance": -0.001}, "tolerance"),
        ({"tolerance": NAN}, "tolerance"),
    ],
)
def test_invalid_rule_fields(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        GateRule(**fields)


def test_rule_defaults_and_description() -> None:
    assert GateRule() == RULE
    assert RULE.describe() == "promote when roc_auc >= 0.900 and roc_auc >= champion's roc_auc - 0.005"
    assert GateRule("pr_auc", 1, 0).describe() == "promote when pr_auc >= 1.000 and pr_auc >= champion's pr_auc - 0.000"
    # A finer tolerance is shown as set, not rounded to 0.003.
    assert "- 0.0025" in GateRule(tolerance=0.0025).describe()


def test_decision_as_dict_is_json_serialisable() -> None:
    decision = decide(RULE, metrics(0.95), metrics(0.99), force="promote", force_reason="canary passed")
    payload = json.loads(json.dumps(decision.as_dict()))

    assert payload == {
        "decision": "forced_promote",
        "promote": True,
        "forced": True,
        "reasons": list(decision.reasons),
        "rule": RULE.describe(),
    }


@pytest.mark.parametrize(
    ("promote", "forced", "word"),
    [
        (True, False, "promote"),
        (False, False, "reject"),
        (True, True, "forced_promote"),
        (False, True, "forced_reject"),
    ],
)
def test_decision_word(promote: bool, forced: bool, word: str) -> None:
    assert GateDecision(promote=promote, reasons=(), forced=forced).decision == word


def test_tolerance_boundary_is_inclusive_despite_float_rounding() -> None:
    rule = GateRule(floor=0.5, tolerance=0.1)
    assert 0.8 - 0.1 > 0.7  # float subtraction lands above the boundary it should equal

    assert decide(rule, metrics(0.7), metrics(0.8)).promote
    assert not decide(rule, metrics(0.7 - 1e-6), metrics(0.8)).promote
