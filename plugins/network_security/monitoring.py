"""Run-time functions of the drift DAG (``network_security_drift``), called inside tasks.

They bind ``tasks.drift`` to Airflow: settings from the Variable, S3 from the ``aws``
connection, the monitoring store through its SQL connection, the count of active
training runs through the Task SDK.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from tasks.config import TRAINING_DAG_ID

log = logging.getLogger(__name__)

DRIFT_CHECK_FIELDS = (
    "dag_run_id",
    "dataset",
    "model_name",
    "champion_version",
    "window_start",
    "window_end",
    "current_rows",
    "evaluated_rows",
    "reference_rows",
    "max_psi",
    "prediction_psi",
    "drifted_features",
    "drift_detected",
    "decision",
    "reason",
    "report_uri",
    "triggered_run_id",
    "checked_at",
)


def plan_check(params: dict[str, Any], window_end: dt.datetime, run_type: Any) -> dict[str, Any]:
    """Settings, drift configuration (run params override it) and the window of this check."""
    from network_security.runtime import load_settings
    from tasks.dataset_spec import load_spec
    from tasks.drift import load_drift_config, window_partitions

    settings = load_settings()
    if params.get("dataset"):
        settings = settings.replace(dataset=params["dataset"])
    spec = load_spec(settings.dataset)
    config = load_drift_config().replace(
        psi_threshold=params.get("psi_threshold"),
        window_hours=params.get("window_hours"),
        min_rows=params.get("min_rows"),
        cooldown_minutes=params.get("cooldown_minutes"),
    )
    end = window_end.astimezone(dt.UTC)
    partitions = window_partitions(end, config.window_hours)
    plan = {
        "dataset": spec.name,
        "raw_prefix": spec.raw_prefix,
        "model_name": settings.model_name or spec.name,
        "aws_conn_id": settings.aws_conn_id,
        "raw_bucket": settings.raw_bucket,
        "lake_bucket": settings.lake_bucket,
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "monitoring_conn_id": settings.monitoring_conn_id,
        "window_end": end.isoformat(),
        "window_start": partitions[0].replace("dt=", "").replace("/", "T") + ":00:00+00:00",
        "partitions": partitions,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "run_type": getattr(run_type, "value", str(run_type)),
    }
    log.info("drift check plan: %s", {k: v for k, v in plan.items() if k != "partitions"})
    return plan


def _config(plan: dict[str, Any]) -> Any:
    from tasks.drift import DriftConfig

    return DriftConfig(**plan["config"])


def _hook(plan: dict[str, Any]) -> Any:
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(plan["monitoring_conn_id"]).get_hook()


def record_check(plan: dict[str, Any], dag_run_id: str, summary: dict[str, Any] | None, **fields: Any) -> None:
    """One row per check in the monitoring store's ``drift_check`` table."""
    summary = summary or {}
    champion = summary.get("champion") or {}
    rows = summary.get("rows") or {}
    row = {
        "dag_run_id": dag_run_id,
        "dataset": plan["dataset"],
        "model_name": plan["model_name"],
        "champion_version": champion.get("model_version"),
        "window_start": plan["window_start"],
        "window_end": plan["window_end"],
        "current_rows": rows.get("current"),
        "evaluated_rows": rows.get("evaluated"),
        "reference_rows": rows.get("reference"),
        "max_psi": summary.get("max_psi"),
        "prediction_psi": summary.get("prediction_psi"),
        "drifted_features": json.dumps(summary.get("drifted_features", [])),
        "drift_detected": int(bool(summary.get("drift_detected"))),
        "report_uri": summary.get("report_uri"),
        "triggered_run_id": None,
        "checked_at": dt.datetime.now(dt.UTC).isoformat(),
        **fields,
    }
    _hook(plan).insert_rows(
        "drift_check",
        [tuple(row[f] for f in DRIFT_CHECK_FIELDS)],
        target_fields=DRIFT_CHECK_FIELDS,
        replace=True,
        replace_index=["dag_run_id"],
    )


def check_drift(plan: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    """Current window vs the champion's training data with Evidently; report and summary to S3 and MLflow.

    Raises:
        AirflowSkipException: Too few current rows (recorded with the reason).
        AirflowFailException: No champion (nothing to compare against): clear message, no retries.
    """
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from network_security.runtime import s3_client
    from tasks import drift, storage
    from tasks.dataset_spec import load_spec

    config = _config(plan)
    spec = load_spec(plan["dataset"])
    client = s3_client(plan)
    try:
        champion = drift.champion_reference(plan["mlflow_tracking_uri"], plan["model_name"])
    except drift.DriftError as err:
        raise AirflowFailException(str(err)) from err
    table, read_rows = drift.read_window(
        client,
        plan["lake_bucket"],
        "predictions",
        plan["partitions"],
        spec,
        (champion["model_name"], champion["model_version"]),
    )
    if table.num_rows < config.min_rows:
        reason = (
            f"{table.num_rows} predictions of champion v{champion['model_version']} in the window "
            f"({read_rows} read; minimum {config.min_rows}): no decision on too little data"
        )
        record_check(
            plan,
            dag_run_id,
            {"champion": champion, "rows": {"current": table.num_rows}},
            decision="skipped",
            reason=reason,
        )
        raise AirflowSkipException(reason)
    evaluated = drift.sample(table, config.sample_cap, config.sample_seed)
    current = drift.to_frame(evaluated, spec)
    reference = drift.reference_frame(client, champion, spec)
    snapshot, psi = drift.psi_report(reference, current, spec, config.psi_threshold)
    summary = drift.summarize(
        psi,
        config.psi_threshold,
        window={"start": plan["window_start"], "end": plan["window_end"], "partitions": len(plan["partitions"])},
        rows={"current": table.num_rows, "evaluated": evaluated.num_rows, "reference": len(reference)},
        champion=champion,
    )
    prefix = f"drift/{plan['dataset']}/{_run_folder(dag_run_id)}"
    html = drift.render_html(snapshot)
    summary.update(drift.write_outputs(client, plan["lake_bucket"], prefix, html, summary))
    run = _log_monitoring_run(plan, summary, html, dag_run_id)
    summary.update(
        mlflow_run_id=run.run_id,
        mlflow_run_url=storage.mlflow_run_url(plan["mlflow_tracking_uri"], run.experiment_id, run.run_id),
        report_url=storage.mlflow_artifact_url(plan["mlflow_tracking_uri"], run.run_id, "drift/report.html"),
    )
    log.info(
        "drift: max PSI %.3f, prediction PSI %.3f, drifted %s (%d of %d rows evaluated)",
        summary["max_psi"],
        summary["prediction_psi"],
        summary["drifted_features"],
        evaluated.num_rows,
        table.num_rows,
    )
    return summary


def _run_folder(dag_run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in dag_run_id)


def _log_monitoring_run(plan: dict[str, Any], summary: dict[str, Any], html: bytes, dag_run_id: str) -> Any:
    """A run in the monitoring experiment with the PSI metrics and the report as artifacts."""
    import mlflow

    mlflow.set_tracking_uri(plan["mlflow_tracking_uri"])
    mlflow.set_experiment(plan["config"]["monitoring_experiment"])
    champion = summary["champion"]
    with mlflow.start_run(run_name=f"drift {plan['window_end'][:16]}") as run:
        mlflow.set_tags(
            {
                "airflow_dag_run_id": dag_run_id,
                "dataset": plan["dataset"],
                "model_name": champion["model_name"],
                "champion_version": champion["model_version"],
                "champion_run_id": champion["run_id"],
                "report_uri": summary["report_uri"],
            }
        )
        mlflow.log_params(
            {
                "psi_threshold": summary["psi_threshold"],
                "window_start": plan["window_start"],
                "window_end": plan["window_end"],
                "sampled": summary["sampled"],
            }
        )
        mlflow.log_metrics(
            {
                "max_psi": summary["max_psi"],
                "prediction_psi": summary["prediction_psi"],
                "drifted_share": summary["drifted_share"],
                "current_rows": summary["rows"]["current"],
                "evaluated_rows": summary["rows"]["evaluated"],
                **{f"psi.{name}": value for name, value in summary["feature_psi"].items()},
            }
        )
        mlflow.log_dict(summary, "drift/metrics.json")
        mlflow.log_text(html.decode(), "drift/report.html")
        return run.info


def recent_checks(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The latest checks of this dataset, newest first (``include/sql/recent_drift_checks.sql``)."""
    from tasks.dataset_spec import PROJECT_ROOT

    sql = (PROJECT_ROOT / "include" / "sql" / "recent_drift_checks.sql").read_text()
    columns = ("dataset", "window_end", "drift_detected", "decision", "triggered_run_id")
    rows = [dict(zip(columns, row, strict=True)) for row in _hook(plan).get_records(sql)]
    return [r for r in rows if r["dataset"] == plan["dataset"]]


def decide(plan: dict[str, Any], summary: dict[str, Any], dag_run_id: str, active_training_runs: int) -> dict[str, Any]:
    """Apply the retrain rule and storm protection; record the check; say what to trigger."""
    from network_security.runtime import s3_client
    from tasks import drift

    config = _config(plan)
    window_end = dt.datetime.fromisoformat(plan["window_end"])
    history = [r for r in recent_checks(plan) if r["window_end"] < plan["window_end"] and r["decision"] != "skipped"]
    triggers = [dt.datetime.fromisoformat(r["window_end"]) for r in history if r["decision"] == "retrain"]
    decision = drift.decide(
        summary["drift_detected"],
        [bool(r["drift_detected"]) for r in history],
        consecutive_checks=config.consecutive_checks,
        active_training_runs=active_training_runs,
        last_trigger_at=max(triggers) if triggers else None,
        window_end=window_end,
        cooldown=dt.timedelta(minutes=config.cooldown_minutes),
    )
    trigger = None
    if decision.trigger:
        day = drift.newest_labelled_day(
            s3_client(plan), plan["raw_bucket"], plan["raw_prefix"], plan["window_end"][:10]
        )
        if day is None:
            decision = drift.Decision(False, "no_labelled_data", "drift, but no labelled drop to retrain on")
        else:
            trigger = {
                "run_id": drift.trigger_run_id(plan["dataset"], window_end),
                "conf": {
                    "ds": day,
                    "dataset": plan["dataset"],
                    "window_days": config.retrain_window_days,
                    "reason": drift.retrain_reason(summary),
                    "drift_report_uri": summary["report_uri"],
                    "max_psi": summary["max_psi"],
                    "drifted_features": summary["drifted_features"],
                },
            }
    record_check(
        plan,
        dag_run_id,
        summary,
        decision=decision.outcome,
        reason=decision.reason,
        triggered_run_id=trigger["run_id"] if trigger else None,
    )
    log.info("drift decision: %s (%s)", decision.outcome, decision.reason)
    return {"trigger": decision.trigger, "outcome": decision.outcome, "reason": decision.reason, "retrain": trigger}


def active_training_runs(ti: Any) -> int:
    """Queued or running runs of the training DAG (through the Task SDK: no DB access from tasks)."""
    return ti.get_dr_count(dag_id=TRAINING_DAG_ID, states=["queued", "running"])
