"""Run-time helpers called from inside tasks (never at DAG parse time)."""

from __future__ import annotations

import logging
from typing import Any

from tasks.config import SETTINGS_VARIABLE, Settings
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout, check_ds

log = logging.getLogger(__name__)


def load_settings() -> Settings:
    """Settings from the ``network_security_config`` Variable and ``NS_*`` environment."""
    from airflow.sdk import Variable

    return Settings.load(Variable.get(SETTINGS_VARIABLE, default="{}"))


TRIGGER_PARAMS = ("reason", "drift_report_uri", "max_psi", "drifted_features")


def plan_run(ds: str, params: dict[str, Any] | None, run_type: str = "manual") -> dict[str, Any]:
    """Resolve what this run works on: dataset, day, window, buckets, MLflow, trigger.

    Run params override settings; the result goes to XCom and every later task reads it
    instead of re-resolving configuration, so one run never mixes two configurations.
    """
    params = params or {}
    settings = load_settings()
    if params.get("dataset"):
        settings = settings.replace(dataset=params["dataset"])
    day = check_ds(params.get("ds") or ds)
    spec = load_spec(settings.dataset)
    layout = DayLayout(settings, spec, day)
    force_gate = params.get("force_gate")
    if force_gate and not (params.get("force_reason") or "").strip():
        raise ValueError("force_gate needs force_reason: say why the gate is overridden (it is logged)")
    trigger = {"run_type": getattr(run_type, "value", str(run_type))}
    trigger.update({key: params[key] for key in TRIGGER_PARAMS if params.get(key) not in (None, "", [])})
    plan = {
        "dataset": spec.name,
        "ds": day,
        "window_days": int(params.get("window_days") or 1),
        "aws_conn_id": settings.aws_conn_id,
        "raw_bucket": settings.raw_bucket,
        "lake_bucket": settings.lake_bucket,
        "raw_key_pattern": layout.raw_key_pattern,
        "split_seed": settings.split_seed,
        "test_size": settings.test_size,
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "mlflow_experiment": settings.mlflow_experiment,
        "model_name": settings.model_name or spec.name,
        "monitoring_conn_id": settings.monitoring_conn_id,
        "deploy_targets": settings.deploy_targets,
        "serving_conn_id": settings.serving_conn_id,
        "trigger": trigger,
        "force_gate": force_gate,
        "force_reason": params.get("force_reason"),
        "smoke_min_accuracy": params.get("smoke_min_accuracy"),
    }
    log.info("run plan: %s", plan)
    return plan


def layout_of(plan: dict[str, Any]) -> DayLayout:
    fields = ("dataset", "aws_conn_id", "raw_bucket", "lake_bucket", "split_seed", "test_size")
    settings = Settings.load({k: plan[k] for k in fields}, environ={})
    return DayLayout(settings, load_spec(plan["dataset"]), plan["ds"])


def s3_client(plan: dict[str, Any]) -> Any:
    """A boto3 S3 client from the AWS connection (its ``endpoint_url`` extra picks emulator or AWS)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=plan["aws_conn_id"]).get_conn()


def browser_url(uri: str, aws_conn_id: str | None = None) -> str:
    """An ``s3://`` URI as a URL a browser opens (the emulator's, or the S3 console's)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.storage import browser_url as url_of

    hook = S3Hook(aws_conn_id=aws_conn_id or Settings().aws_conn_id)
    return url_of(hook.get_conn(), uri, hook.conn_config.endpoint_url, hook.conn_region_name)


def boto3_options(plan: dict[str, Any]) -> dict[str, Any]:
    """The same connection as keyword arguments for clients Airflow does not build (GX's)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=plan["aws_conn_id"])
    credentials = hook.get_credentials()
    options = {
        "aws_access_key_id": credentials.access_key,
        "aws_secret_access_key": credentials.secret_key,
        "region_name": hook.conn_region_name,
    }
    if credentials.token:
        options["aws_session_token"] = credentials.token
    if hook.conn_config.endpoint_url:
        options["endpoint_url"] = hook.conn_config.endpoint_url
    return options


def reject(plan: dict[str, Any], reason: str, stage: str, files: list[str] | None = None) -> None:
    """Quarantine the day's drop and fail the task without retries (bad data stays bad)."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.validate import quarantine_drop

    quarantine_uri = quarantine_drop(s3_client(plan), layout_of(plan), reason, stage, files)
    raise AirflowFailException(f"{stage} rejected the drop: {reason} (quarantined, see {quarantine_uri})")


def ingest(plan: dict[str, Any]) -> dict[str, Any]:
    from tasks.ingest import DataRejected, ingest_day

    try:
        return ingest_day(s3_client(plan), layout_of(plan)).as_xcom()
    except DataRejected as err:
        reject(plan, err.reason, "ingest", err.files)
        raise  # unreachable: reject() raises


def transform(plan: dict[str, Any]) -> dict[str, Any]:
    from tasks.transform import transform_day

    return transform_day(s3_client(plan), layout_of(plan), plan["test_size"], plan["split_seed"], plan["window_days"])


def train(
    plan: dict[str, Any], features: dict[str, Any], validation_uri: str, dag_id: str, run_id: str
) -> dict[str, Any]:
    from tasks import storage
    from tasks.train import load_training_config, train_and_register
    from tasks.transform import read_preprocessor

    client = s3_client(plan)
    layout = layout_of(plan)
    trigger = plan["trigger"]
    trained = train_and_register(
        train=storage.read_parquet(client, storage.parse_s3_uri(features["train_uri"])),
        preprocessor=read_preprocessor(client, features["preprocessor_uri"]),
        spec=layout.spec,
        config=load_training_config(),
        tracking_uri=plan["mlflow_tracking_uri"],
        experiment=plan["mlflow_experiment"],
        model_name=plan["model_name"],
        lineage={
            "ds": plan["ds"],
            "window_days": plan["window_days"],
            "snapshot_uris": features["snapshot_uris"],
            "content_hashes": features["content_hashes"],
            "validation_uri": validation_uri,
            "features_uri": features["features_uri"],
        },
        tags={
            "airflow_dag_id": dag_id,
            "airflow_run_id": run_id,
            "ds": plan["ds"],
            "dataset": plan["dataset"],
            "trigger": trigger["run_type"],
            "trigger_reason": str(
                trigger.get("reason", "scheduled" if trigger["run_type"] == "scheduled" else "manual")
            ),
            **({"drift_report_uri": str(trigger["drift_report_uri"])} if trigger.get("drift_report_uri") else {}),
        },
    )
    return {**trained, "mlflow_run_url": _run_url(plan, trained)}


def _run_url(plan: dict[str, Any], training: dict[str, Any]) -> str:
    from tasks.storage import mlflow_run_url

    return mlflow_run_url(plan["mlflow_tracking_uri"], training["experiment_id"], training["run_id"])


def evaluate(
    plan: dict[str, Any], features: dict[str, Any], training: dict[str, Any], validation_uri: str
) -> dict[str, Any]:
    from tasks import storage
    from tasks.registry import evaluate_challenger
    from tasks.train import load_training_config

    if plan.get("force_gate"):
        log.warning("gate override requested: %s (%s)", plan["force_gate"], plan["force_reason"])
    evaluation = evaluate_challenger(
        test=storage.read_parquet(s3_client(plan), storage.parse_s3_uri(features["test_uri"])),
        spec=layout_of(plan).spec,
        rule=load_training_config().gate,
        tracking_uri=plan["mlflow_tracking_uri"],
        model_name=plan["model_name"],
        training=training,
        data={
            "dataset": plan["dataset"],
            "ds": plan["ds"],
            "window_days": plan["window_days"],
            "snapshot_uris": features["snapshot_uris"],
            "content_hashes": features["content_hashes"],
            "train_rows": features["train_rows"],
            "test_rows": features["test_rows"],
            "validation_uri": validation_uri,
        },
        trigger=plan["trigger"],
        force=plan.get("force_gate"),
        force_reason=plan.get("force_reason"),
    )
    return {**evaluation, "mlflow_run_url": _run_url(plan, training)}


PROMOTION_LOG_FIELDS = (
    "dag_run_id",
    "model_name",
    "model_version",
    "mlflow_run_id",
    "ds",
    "decision",
    "reason",
    "primary_metric",
    "challenger_metric",
    "champion_version",
    "champion_metric",
    "metrics_json",
    "decided_at",
)


def record_decision(plan: dict[str, Any], evaluation: dict[str, Any], dag_run_id: str) -> None:
    """One row in the monitoring store's promotion log, through Airflow's SQL hook of the connection."""
    import datetime as dt
    import json
    import math

    from airflow.sdk import BaseHook

    def metric(metrics: dict[str, float] | None) -> float | None:
        value = (metrics or {}).get(evaluation["primary_metric"])
        return value if value is not None and math.isfinite(value) else None

    row = (
        dag_run_id,
        plan["model_name"],
        evaluation["challenger_version"],
        evaluation["run_id"],
        plan["ds"],
        evaluation["decision"],
        "; ".join(evaluation["reasons"]),
        evaluation["primary_metric"],
        metric(evaluation["challenger_metrics"]),
        evaluation["champion_version"],
        metric(evaluation["champion_metrics"]),
        json.dumps({"challenger": evaluation["challenger_metrics"], "champion": evaluation["champion_metrics"]}),
        dt.datetime.now(dt.UTC).isoformat(),
    )
    hook = BaseHook.get_connection(plan["monitoring_conn_id"]).get_hook()
    hook.insert_rows(
        "promotion_log",
        [row],
        target_fields=PROMOTION_LOG_FIELDS,
        replace=True,
        replace_index=["dag_run_id", "model_version"],
    )


def promote(plan: dict[str, Any], evaluation: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    from tasks.registry import promote as move_aliases

    aliases = move_aliases(
        tracking_uri=plan["mlflow_tracking_uri"],
        model_name=plan["model_name"],
        version=evaluation["challenger_version"],
    )
    record_decision(plan, evaluation, dag_run_id)
    return {**aliases, "decision": evaluation["decision"], "reasons": evaluation["reasons"]}


def keep_champion(plan: dict[str, Any], evaluation: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    log.warning("champion kept (v%s): %s", evaluation["champion_version"], "; ".join(evaluation["reasons"]))
    record_decision(plan, evaluation, dag_run_id)
    return {
        "champion_version": evaluation["champion_version"],
        "decision": evaluation["decision"],
        "reasons": evaluation["reasons"],
    }


def choose_release(plan: dict[str, Any], action: str, reason: str | None, dag_run_id: str) -> dict[str, Any]:
    """``rollback``: champion back to previous_champion before the deploy group ships it."""
    from tasks.registry import roll_back

    if action != "rollback":
        return {"action": action}
    moved = roll_back(
        tracking_uri=plan["mlflow_tracking_uri"],
        model_name=plan["model_name"],
        reason=f"{reason} (rollback requested by {dag_run_id})",
    )
    return {"action": action, **moved}
