"""Model registry: champion/challenger evaluation on the same holdout, and alias moves.

Aliases, not stages: ``challenger`` (just trained), ``champion`` (serving) and
``previous_champion`` (the rollback target). Only ``promote`` moves ``champion``,
and only after the gate said so; evaluation never touches an alias.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.dataset_spec import DatasetSpec
from tasks.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    positive_scores,
    pr_curve_png,
    roc_curve_png,
)
from tasks.gate import GateRule, decide
from tasks.layout import TEST_SPLIT, features_file
from tasks.model_card import render_model_card
from tasks.model_io import load_model
from tasks.tracking import CHAMPION, PREVIOUS_CHAMPION, alias_version, check_tracking_server

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasedVersion:
    """The version an alias points at, with the run that logged it and that run's ``lineage.json``.

    Attributes:
        model_name: Registered model name.
        version: Model version.
        run_id: The MLflow run that logged the version.
        lineage: The run's ``lineage.json`` (ds, snapshot URIs and hashes, features URI, ...).
        tags: The version's tags (``content_sha256``, ``rolled_back``, ...).
    """

    model_name: str
    version: str
    run_id: str
    lineage: dict[str, Any]
    tags: dict[str, str]


def alias_lineage(tracking_uri: str, model_name: str, alias: str) -> AliasedVersion | None:
    """The version ``alias`` points at and the lineage of its training run; None when the alias is not set.

    The one lookup behind the deploy's release (the held-out split) and the drift check's
    reference (the training snapshots).
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    version = alias_version(client, model_name, alias)
    if version is None:
        return None
    details = client.get_model_version(model_name, version)
    mlflow.set_tracking_uri(tracking_uri)
    lineage = mlflow.artifacts.load_dict(f"runs:/{details.run_id}/lineage.json")
    return AliasedVersion(model_name, str(version), details.run_id, dict(lineage), dict(details.tags or {}))


def load_version(tracking_uri: str, model_name: str, version: str) -> Any:
    """A registered version, through the skops-only loader (``tasks.model_io.load_model``)."""
    return load_model(tracking_uri, model_name, version)


def score(model: Any, test: pd.DataFrame, spec: DatasetSpec) -> tuple[dict[str, float], Any, Any]:
    features, truth = test[spec.feature_names], test[spec.target.name]
    predictions = model.predict(features)
    scores = positive_scores(model, features, spec.positive_class)
    return classification_metrics(truth, predictions, scores, spec.positive_class), predictions, scores


def evaluate_challenger(
    *,
    test: pd.DataFrame,
    spec: DatasetSpec,
    rule: GateRule,
    tracking_uri: str,
    model_name: str,
    training: dict[str, Any],
    data: dict[str, Any],
    trigger: dict[str, Any] | None,
    force: str | None = None,
    force_reason: str | None = None,
) -> dict[str, Any]:
    """Score challenger and champion on the same test split, log the evidence, decide.

    Logs to the training run: test metrics of both models, confusion matrix, ROC and PR
    plots, and the model card with the gate decision and its reasons. Moves no alias.

    Returns:
        The decision (``promote``/``reject``/``forced_*``), its reasons, both versions and metrics.
    """
    import mlflow
    from mlflow import MlflowClient

    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    challenger_version = training["model_version"]
    champion_version = alias_version(client, model_name, CHAMPION)

    challenger = load_version(tracking_uri, model_name, challenger_version)
    challenger_metrics, predictions, challenger_scores = score(challenger, test, spec)
    curves = {f"challenger v{challenger_version}": challenger_scores}
    champion_metrics = None
    if champion_version is not None:
        champion_metrics, _, champion_scores = score(
            load_version(tracking_uri, model_name, champion_version), test, spec
        )
        curves[f"champion v{champion_version}"] = champion_scores
    decision = decide(rule, challenger_metrics, champion_metrics, force=force, force_reason=force_reason)
    log.info("gate: %s (%s)", decision.decision, "; ".join(decision.reasons))

    card = render_model_card(
        model_name=model_name,
        challenger_version=challenger_version,
        champion_version=champion_version,
        spec_dict=spec.to_dict(),
        data=data,
        training={
            "estimator": training["best_estimator"],
            "params": training["params"],
            "cv_metrics": training["cv_metrics"],
            "mlflow_run_id": training["run_id"],
            "git_sha": training["git_sha"],
        },
        challenger_metrics=challenger_metrics,
        champion_metrics=champion_metrics,
        decision=decision,
        trigger=trigger,
    )
    truth = test[spec.target.name]
    labels = sorted(spec.target.allowed_values)
    with mlflow.start_run(run_id=training["run_id"]), tempfile.TemporaryDirectory() as folder:
        mlflow.log_metrics({f"test_{k}": v for k, v in challenger_metrics.items() if v == v})
        if champion_metrics:
            mlflow.log_metrics({f"champion_test_{k}": v for k, v in champion_metrics.items() if v == v})
        plots = {
            "confusion_matrix.png": confusion_matrix_png(
                truth, predictions, labels, f"challenger v{challenger_version}"
            ),
            "roc_curve.png": roc_curve_png(truth, curves, spec.positive_class, "ROC on the test split"),
            "pr_curve.png": pr_curve_png(truth, curves, spec.positive_class, "Precision-recall on the test split"),
        }
        for name, body in plots.items():
            (Path(folder) / name).write_bytes(body)
        mlflow.log_artifacts(folder, artifact_path="evaluation")
        mlflow.log_text(card, "model_card.md")
        mlflow.log_dict(decision.as_dict(), "evaluation/gate_decision.json")
        mlflow.set_tags(
            {
                "gate_decision": decision.decision,
                "gate_reasons": " | ".join(decision.reasons)[:5000],
                "champion_version_at_evaluation": champion_version or "none",
            }
        )
    return {
        "decision": decision.decision,
        "promote": decision.promote,
        "forced": decision.forced,
        "reasons": list(decision.reasons),
        "rule": rule.describe(),
        "primary_metric": rule.primary_metric,
        "challenger_version": challenger_version,
        "champion_version": champion_version,
        "challenger_metrics": challenger_metrics,
        "champion_metrics": champion_metrics,
        "run_id": training["run_id"],
    }


class ChampionMoved(RuntimeError):
    """``champion`` no longer points where the run read it (another run moved it): nothing is overwritten."""


_ANY = object()


def promote(
    *, tracking_uri: str, model_name: str, version: str, expected_champion: Any = _ANY
) -> dict[str, str | None]:
    """Make ``version`` the champion; the old champion becomes ``previous_champion``.

    ``expected_champion`` (a version, or None for "no champion yet") makes it a compare-and-swap:
    when ``champion`` points elsewhere now, :class:`ChampionMoved` is raised and no alias moves.
    Callers serialise alias moves on the ``aliases`` pool (one slot), so the check and the move
    are not interleaved with another run's.

    ``previous_champion`` is written first: if the second call fails, ``champion`` still
    points at the old model and the run fails, so a partial promotion never serves.
    """
    import mlflow
    from mlflow import MlflowClient

    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    old = alias_version(client, model_name, CHAMPION)
    if expected_champion is not _ANY and old != expected_champion and old != version:
        raise ChampionMoved(
            f"{model_name}: champion is v{old} now, this run read v{expected_champion}; another run moved it, "
            f"so v{version} is not promoted over it (retrain or release again)"
        )
    if old == version:
        log.info("%s v%s is already the champion", model_name, version)
        return {
            "champion_version": version,
            "previous_champion_version": alias_version(client, model_name, PREVIOUS_CHAMPION),
        }
    if old is not None:
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, old)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("%s: champion v%s -> v%s", model_name, old, version)
    return {"champion_version": version, "previous_champion_version": old}


class NothingToRollBack(RuntimeError):
    """There is no ``previous_champion`` to return to."""


def roll_back(*, tracking_uri: str, model_name: str, reason: str, request_id: str = "") -> dict[str, str | None]:
    """Make ``previous_champion`` the champion again; the demoted version is tagged with why.

    ``previous_champion`` is removed afterwards: it now serves, and the version before it
    is not known to be good, so a second rollback has nothing to return to (and says so).
    A retry of the same request (``request_id``, e.g. the DAG run id) finds its own rollback done
    (the restored version carries ``restored_by``) and returns it again, so a retried task still
    reaches the targets.

    Returns:
        ``champion_version`` (restored) and ``rolled_back_version`` (demoted, may be None
        when no champion was set).

    Raises:
        NothingToRollBack: No ``previous_champion`` alias exists.
    """
    from mlflow import MlflowClient

    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    previous = alias_version(client, model_name, PREVIOUS_CHAMPION)
    current = alias_version(client, model_name, CHAMPION)
    if previous is None:
        tags = client.get_model_version(model_name, current).tags if current else {}
        if request_id and tags.get("restored_by") == request_id:
            log.info("%s: rollback %s already done, champion is v%s", model_name, request_id, current)
            return {"champion_version": current, "rolled_back_version": tags.get("restored_from") or None}
        raise NothingToRollBack(
            f"{model_name} has no {PREVIOUS_CHAMPION} alias (champion is v{current}): nothing to roll back to"
        )
    if request_id:
        client.set_model_version_tag(model_name, previous, "restored_by", request_id)
        client.set_model_version_tag(model_name, previous, "restored_from", current or "")
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
    if current is not None and current != previous:
        client.set_model_version_tag(model_name, current, "rolled_back", reason[:5000])
    log.warning("%s: champion v%s rolled back to v%s (%s)", model_name, current, previous, reason)
    return {"champion_version": previous, "rolled_back_version": current}


def release_info(*, tracking_uri: str, model_name: str, alias: str = CHAMPION) -> dict[str, Any]:
    """What a deploy needs to know about the version an alias points at.

    Returns:
        ``model_name``, ``model_version``, ``run_id``, ``git_sha``, ``content_sha256`` and
        ``test_uri`` (the held-out split the version was evaluated on: the smoke records).

    Raises:
        LookupError: The alias is not set.
    """
    from mlflow import MlflowClient

    check_tracking_server(tracking_uri)
    aliased = alias_lineage(tracking_uri, model_name, alias)
    if aliased is None:
        raise LookupError(f"registered model {model_name!r} has no {alias!r} alias: train and promote a model first")
    run = MlflowClient(tracking_uri=tracking_uri).get_run(aliased.run_id)
    return {
        "model_name": model_name,
        "model_version": aliased.version,
        "run_id": aliased.run_id,
        "git_sha": run.data.tags.get("git_sha", ""),
        "content_sha256": aliased.tags.get("content_sha256", ""),
        "test_uri": features_file(aliased.lineage["features_uri"], TEST_SPLIT),
    }


def record_release(*, tracking_uri: str, run_id: str, outcome: dict[str, Any]) -> None:
    """The release's outcome on the candidate's run: ``release/outcome.json`` and a section of the model card."""
    import json

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        card = mlflow.artifacts.load_text(f"runs:/{run_id}/model_card.md")
    except Exception:  # noqa: BLE001 - no card yet: the section stands alone
        card = ""
    marker = "\n## Release on live evidence\n"
    card = card.split(marker)[0]
    lines = [
        f"Outcome: **{outcome.get('outcome')}** at stage `{outcome.get('stage')}`.",
        "",
        *[f"- {reason}" for reason in outcome.get("reasons") or []],
        "",
        "Metrics of the deciding stage:",
        "",
        "```json",
        json.dumps(outcome.get("metrics") or {}, indent=2, sort_keys=True),
        "```",
    ]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(outcome, "release/outcome.json")
        mlflow.log_text(card + marker + "\n" + "\n".join(lines) + "\n", "model_card.md")
        mlflow.set_tag("release_outcome", str(outcome.get("outcome")))
