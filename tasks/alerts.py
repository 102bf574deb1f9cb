"""What an alert says: the webhook payloads (``plugins/network_security/alerts.py`` sends them).

Plain dicts with a ``text`` field (what Slack, Teams and Mattermost incoming webhooks display)
and the structured fields (``event``, ``dag_id``, ``run_id``, ...).
"""

from __future__ import annotations

from typing import Any


def task_failed(
    *,
    dag_id: str,
    task_id: str,
    run_id: str,
    try_number: int,
    error: BaseException | None,
    map_label: str = "",
    log_url: str | None = None,
) -> dict[str, Any]:
    """A task that failed for good; ``map_label`` names a mapped instance (its dataset, as the DAG labels it)."""
    reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
    where = f"{dag_id}.{task_id}" + (f" [{map_label}]" if map_label else "")
    return {
        "event": "task_failed",
        "text": f":red_circle: {where} failed in {run_id} (try {try_number}): {reason}"[:3000],
        "dag_id": dag_id,
        "task_id": task_id,
        "map_index": map_label or None,
        "run_id": run_id,
        "try_number": try_number,
        "error": reason[:2000],
        "log_url": log_url,
    }


def task_failed_of(ti: Any, error: BaseException | None) -> dict[str, Any]:
    """:func:`task_failed` for a task instance (anything with the attributes of Airflow's); mapped ones labelled."""
    mapped = getattr(ti, "map_index", -1)
    label = getattr(ti, "rendered_map_index", None) or (str(mapped) if mapped not in (-1, None) else "")
    return task_failed(
        dag_id=ti.dag_id,
        task_id=ti.task_id,
        run_id=ti.run_id,
        try_number=ti.try_number,
        error=error,
        map_label=label,
        log_url=getattr(ti, "log_url", None),
    )


def drift_retraining(dag_id: str, run_id: str, decision: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A drift check that triggered a training run (``decision``: ``tasks.drift.decision_xcom``)."""
    retrain = decision.get("retrain") or {}
    conf = retrain.get("conf") or {}
    champion = summary.get("champion") or {}
    return {
        "event": "drift_retraining_triggered",
        "text": (
            f":warning: drift on {conf.get('dataset')} ({champion.get('model_name')} "
            f"v{champion.get('model_version')}): {conf.get('reason')}; "
            f"training run {retrain.get('run_id')} of {decision.get('training_dag_id')} triggered"
        ),
        "dag_id": dag_id,
        "run_id": run_id,
        "dataset": conf.get("dataset"),
        "training_dag_id": decision.get("training_dag_id"),
        "training_run_id": retrain.get("run_id"),
        "max_psi": summary.get("max_psi"),
        "prediction_psi": summary.get("prediction_psi"),
        "drifted_features": summary.get("drifted_features"),
        "report_url": summary.get("report_url"),
        "reason": conf.get("reason"),
    }


def retraining_triggered(
    dag_id: str,
    run_id: str,
    decision: dict[str, Any] | None,
    drift: dict[str, Any] | None,
    quality: dict[str, Any] | None,
) -> dict[str, Any]:
    """The payload of a triggered retrain: the drift DAG's (its check's summary ``drift``) or the quality DAG's."""
    from tasks.quality import retraining_alert

    decision = decision or {}
    if drift:
        return drift_retraining(dag_id, run_id, decision, drift)
    return retraining_alert(dag_id, run_id, quality or {}, decision.get("retrain") or {})


def release_aborted(model_name: str, version: str, dag_run_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """A release stage that aborted and rolled back (``outcome``: ``tasks.release_run.abort``'s)."""
    text = f"{model_name} v{version}: {'; '.join(outcome['reasons'])}"
    return {"event": "release_aborted", "text": text, "dag_run_id": dag_run_id, **outcome}
