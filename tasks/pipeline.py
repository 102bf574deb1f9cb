"""The training DAG's steps, as plain functions of the run plan and the clients they need.

``ingest`` → (validation: the GX operator) → ``transform`` → ``start_training`` →
``train_candidate`` (one per candidate, side by side) → ``register_best`` → ``evaluate`` →
``promote`` or ``keep_champion``. The work is in ``tasks.ingest``, ``tasks.transform``,
``tasks.train`` and ``tasks.registry``; these functions decide what each step is given and
what it records (lineage, tags, the promotion log row, the asset events).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tasks import monitoring_store, storage

if TYPE_CHECKING:
    from tasks.monitoring_store import Store
    from tasks.plan import RunPlan

log = logging.getLogger(__name__)


def ingest(plan: RunPlan, s3: Any) -> dict[str, Any]:
    """The day's CSV files as one immutable snapshot (raises ``DataRejected`` for bad data)."""
    from tasks.ingest import ingest_day

    return ingest_day(s3, plan.layout).as_xcom()


def snapshot_event(plan: RunPlan, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot asset event's details (one event per day, with its content hash)."""
    return {
        "dataset": plan.dataset,
        "ds": plan.ds,
        "uri": snapshot["snapshot_uri"],
        "content_hash": snapshot["content_hash"],
        "rows": snapshot["rows"],
    }


def transform(plan: RunPlan, s3: Any) -> dict[str, Any]:
    """Split the window's snapshots and fit the preprocessor on the train split.

    A run triggered by live quality names the labelled feedback window in its conf
    (``trigger["feedback"]``, see ``tasks.quality.retrain_conf``): its served inputs with their
    true labels, one row per request id, join the snapshots, and the features' ``feedback``
    lineage (partitions, row counts) goes on to the MLflow run.
    """
    from tasks.transform import transform_day

    settings = plan.settings
    return transform_day(
        s3, plan.layout, settings.test_size, settings.split_seed, plan.window_days, feedback=learned_feedback(plan, s3)
    )


def learned_feedback(plan: RunPlan, s3: Any) -> tuple[Any, dict[str, Any]] | None:
    """The labelled feedback window the run's trigger names, as training rows and lineage; None when it names none."""
    from tasks.feedback import feedback_training_frame

    window = plan.trigger.get("feedback")
    if not window:
        return None
    frame, lineage = feedback_training_frame(
        s3,
        raw_bucket=plan.settings.raw_bucket,
        lake_bucket=plan.settings.lake_bucket,
        spec=plan.spec,
        model_name=window.get("model_name") or plan.model_name,
        feedback_days=list(window["feedback_days"]),
        predictions_from=window["predictions_from"],
        predictions_to=window["predictions_to"],
    )
    log.info("feedback window %s: %d labelled served rows added", window["feedback_days"], len(frame))
    return frame, lineage


def start_training(
    plan: RunPlan, s3: Any, features: Mapping[str, Any], validation_uri: str, dag_id: str, run_id: str
) -> list[dict[str, Any]]:
    """Open the run's parent MLflow run; one assignment per candidate (a mapped task each):
    the candidate's name and the parent run."""
    from tasks.train import candidate_assignments, load_training_config, start_training_run

    settings = plan.settings
    training_run = start_training_run(
        train=storage.read_parquet(s3, storage.parse_s3_uri(features["train_uri"])),
        spec=plan.spec,
        config=load_training_config(),
        tracking_uri=settings.mlflow_tracking_uri,
        experiment=settings.mlflow_experiment,
        lineage=plan.training_lineage(features, validation_uri),
        tags=plan.training_tags(dag_id, run_id),
    )
    return candidate_assignments(training_run)


def train_candidate(
    plan: RunPlan, s3: Any, features: Mapping[str, Any], assignment: Mapping[str, Any]
) -> dict[str, Any]:
    """One candidate cross-validated in its nested MLflow run under the parent run."""
    from tasks.train import load_training_config, log_candidate
    from tasks.transform import read_preprocessor

    settings = plan.settings
    result = log_candidate(
        preprocessor=read_preprocessor(s3, features["preprocessor_uri"]),
        train=storage.read_parquet(s3, storage.parse_s3_uri(features["train_uri"])),
        spec=plan.spec,
        config=load_training_config(),
        name=assignment["candidate"],
        tracking_uri=settings.mlflow_tracking_uri,
        experiment=settings.mlflow_experiment,
        parent_run_id=assignment["run_id"],
    )
    return result.as_xcom()


def register_best(
    plan: RunPlan,
    s3: Any,
    features: Mapping[str, Any],
    validation_uri: str,
    assignments: Iterable[Mapping[str, Any]],
    candidates: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """The best candidate refitted on the whole train split, registered as ``challenger``; its run's URL."""
    from tasks.train import CandidateResult, load_training_config, parent_run
    from tasks.train import register_best as register
    from tasks.transform import read_preprocessor

    settings = plan.settings
    trained = register(
        train=storage.read_parquet(s3, storage.parse_s3_uri(features["train_uri"])),
        preprocessor=read_preprocessor(s3, features["preprocessor_uri"]),
        spec=plan.spec,
        config=load_training_config(),
        results=[CandidateResult.from_xcom(c) for c in candidates],
        training_run=parent_run(list(assignments)),
        tracking_uri=settings.mlflow_tracking_uri,
        experiment=settings.mlflow_experiment,
        model_name=plan.model_name,
        lineage=plan.training_lineage(features, validation_uri),
    )
    url = storage.mlflow_run_url(settings.mlflow_tracking_uri, trained["experiment_id"], trained["run_id"])
    return {**trained, "mlflow_run_url": url}


def train(
    plan: RunPlan, s3: Any, features: Mapping[str, Any], validation_uri: str, dag_id: str, run_id: str
) -> dict[str, Any]:
    """The DAG's three training steps in sequence in this process: parent run, every candidate, register."""
    assignments = start_training(plan, s3, features, validation_uri, dag_id, run_id)
    candidates = [train_candidate(plan, s3, features, assignment) for assignment in assignments]
    return register_best(plan, s3, features, validation_uri, assignments, candidates)


def evaluate(
    plan: RunPlan, s3: Any, features: Mapping[str, Any], training: Mapping[str, Any], validation_uri: str
) -> dict[str, Any]:
    """Challenger and champion on the same test split; the gate's decision (no alias moves)."""
    from tasks.registry import evaluate_challenger
    from tasks.train import load_training_config

    if plan.force_gate:
        log.warning("gate override requested: %s (%s)", plan.force_gate, plan.force_reason)
    settings = plan.settings
    evaluation = evaluate_challenger(
        test=storage.read_parquet(s3, storage.parse_s3_uri(features["test_uri"])),
        spec=plan.spec,
        rule=load_training_config().gate,
        tracking_uri=settings.mlflow_tracking_uri,
        model_name=plan.model_name,
        training=dict(training),
        data=plan.evaluation_data(features, validation_uri),
        trigger=dict(plan.trigger),
        force=plan.force_gate,
        force_reason=plan.force_reason,
    )
    return {**evaluation, "mlflow_run_url": training["mlflow_run_url"]}


def record_decision(plan: RunPlan, store: Store, evaluation: Mapping[str, Any], dag_run_id: str) -> None:
    """The gate decision's row in the promotion log (a rerun of the run overwrites it)."""
    row = monitoring_store.promotion_row(
        dag_run_id=dag_run_id,
        model_name=plan.model_name,
        ds=plan.ds,
        evaluation=evaluation,
        decided_at=monitoring_store.now(),
    )
    monitoring_store.write(store, "promotion_log", [row])


def promote(plan: RunPlan, store: Store, evaluation: Mapping[str, Any], dag_run_id: str) -> dict[str, Any]:
    """``champion`` to the challenger (the old one becomes ``previous_champion``); logged."""
    from tasks.registry import promote as move_aliases

    aliases = move_aliases(
        tracking_uri=plan.settings.mlflow_tracking_uri,
        model_name=plan.model_name,
        version=evaluation["challenger_version"],
    )
    record_decision(plan, store, evaluation, dag_run_id)
    return {**aliases, "decision": evaluation["decision"], "reasons": evaluation["reasons"]}


def keep_champion(plan: RunPlan, store: Store, evaluation: Mapping[str, Any], dag_run_id: str) -> dict[str, Any]:
    """Both aliases stay; the reasons are logged."""
    log.warning("champion kept (v%s): %s", evaluation["champion_version"], "; ".join(evaluation["reasons"]))
    record_decision(plan, store, evaluation, dag_run_id)
    return {
        "champion_version": evaluation["champion_version"],
        "decision": evaluation["decision"],
        "reasons": evaluation["reasons"],
    }


def champion_event(plan: RunPlan, promoted: Mapping[str, Any], evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The champion asset event's details (one per promotion)."""
    return {
        "dataset": plan.dataset,
        "model_name": plan.model_name,
        "version": promoted["champion_version"],
        "previous_version": promoted.get("previous_champion_version"),
        "mlflow_run_id": evaluation["run_id"],
        "ds": plan.ds,
    }
