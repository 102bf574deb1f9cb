"""
### Network-security training

Keeps the phishing classifier current. Every day it waits for the day's labelled
drop in the raw bucket, snapshots and validates it, builds the features, trains
candidate models tracked in MLflow and promotes the best one only if it beats the
gate against the current champion.

| step | what it does | output (XCom) |
| --- | --- | --- |
| `plan_run` | resolves dataset, day, window, buckets, MLflow and the trigger from the `network_security_config` Variable and the run's params | plan |
| `ensure_monitoring_store` | creates the promotion log table (`include/sql/monitoring_store.sql`) if missing | |
| `wait_for_drop` | `S3KeySensor` on `s3://<raw>/<raw_prefix>/ds=<ds>/*.csv` (deferrable when `[operators] default_deferrable` is on) | |
| `ingest` | reads every CSV of the day, coerces dtypes, counts duplicates, writes `snapshots/<dataset>/ds=<ds>/data.parquet` + manifest with the content hash | snapshot URI + hash |
| `validate` | the dataset's GX suite (`include/expectations/`) via the GX provider; result JSON + report to `validation/`; on failure the drop is copied to `quarantine/` with the reason and the run stops | result URI |
| `transform` | stratified split (fixed seed) of the last `window_days` snapshots, preprocessing fitted on train only, written to `features/<dataset>/ds=<ds>/` | feature URIs |
| `train` | candidates (`include/training.yaml`) compared by CV, each a nested MLflow run; the best (preprocessing + estimator, skops) registered as alias `challenger` | run id, version |
| `evaluate` | challenger and champion scored on the same test split; metrics, plots and model card logged to the run | decision + reasons |
| `gate` | branches on the decision (rule in `include/training.yaml`: floor and tolerance on the primary metric) | |
| `promote_champion` | `champion` -> challenger, `previous_champion` -> old champion, row in the promotion log | aliases |
| `keep_champion` | leaves both aliases untouched, logs the reasons, row in the promotion log | reasons |
| `deploy.*` | only after a promotion: serving image in ECR, blue/green rollout on the tagged EC2 fleet via SSM, the local model server reloaded, smoke test, deployment log; on any failure `deploy.rollback` moves `champion` back to `previous_champion` on every target and fails the run | image URI, instance ids, URL |

Bad data fails fast (no retries) and is quarantined; infrastructure errors (S3, MLflow)
are retried. A rejected challenger ends the run successfully with `promote_champion` skipped.

**Trigger**: daily by schedule (`NS_SCHEDULE_NETWORK_SECURITY_TRAINING`), manually, or by the drift DAG. Params (all optional):
`ds` (default: the logical date), `dataset`, `window_days` (train on the last N days),
`reason` / `drift_report_uri` / `max_psi` / `drifted_features` (recorded on the MLflow run),
`force_gate` (`promote` or `reject`) with a mandatory `force_reason`, logged in the
model card and the promotion log; `smoke_min_accuracy` (default from `include/deploy.yaml`).
Which targets a champion ships to is the `deploy_targets` setting (`local,ec2`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import Param, chain, dag, task

from network_security import alerts, assets, runtime
from network_security.delivery import deploy_group
from network_security.links import MLflowRunLink, with_links
from network_security.operators import SnapshotValidationOperator
from tasks.config import AWS_CONN_ID, TRAINING_DAG_ID, Settings, dag_schedule, task_retry_delay

INCLUDE = Path(__file__).resolve().parent.parent / "include"
MONITORING_CONN_ID = Settings().monitoring_conn_id


@dag(
    dag_id=TRAINING_DAG_ID,
    schedule=dag_schedule(TRAINING_DAG_ID, "@daily"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "on_failure_callback": alerts.on_task_failure,
        "retry_delay": timedelta(seconds=task_retry_delay()),
        "execution_timeout": timedelta(hours=1),
    },
    tags=["network-security", "training", "mlops"],
    template_searchpath=[str(INCLUDE)],
    params={
        "ds": Param(
            None, type=["null", "string"], format="date", description="Day (YYYY-MM-DD); default: logical date"
        ),
        "dataset": Param(None, type=["null", "string"], description="Dataset spec name; default: the Variable's"),
        "window_days": Param(1, type="integer", minimum=1, maximum=90, description="Train on the last N days"),
        "reason": Param(None, type=["null", "string"], description="Why this run was triggered (drift, operator)"),
        "drift_report_uri": Param(None, type=["null", "string"], description="Evidently report behind a drift run"),
        "max_psi": Param(None, type=["null", "number"], description="Largest PSI seen by the drift check"),
        "drifted_features": Param([], type="array", description="Features past the PSI threshold"),
        "force_gate": Param(
            None, type=["null", "string"], enum=[None, "promote", "reject"], description="Override the gate"
        ),
        "force_reason": Param(None, type=["null", "string"], description="Why the gate is overridden (required)"),
        "smoke_min_accuracy": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Accuracy the deployed model must reach on the smoke records; default include/deploy.yaml",
        ),
    },
    render_template_as_native_obj=True,
)
def network_security_training():
    @task
    def plan_run(ds=None, params=None, dag_run=None) -> dict:
        """Resolve dataset, day, window, buckets, MLflow and trigger for this run."""
        return runtime.plan_run(ds, params, dag_run.run_type)

    plan = plan_run()

    ensure_monitoring_store = SQLExecuteQueryOperator(
        task_id="ensure_monitoring_store",
        doc_md="Creates the promotion log of the monitoring store if it does not exist.",
        conn_id=MONITORING_CONN_ID,
        sql="sql/monitoring_store.sql",
        split_statements=True,
    )

    wait_for_drop = S3KeySensor(
        task_id="wait_for_drop",
        doc_md="Waits for at least one CSV of the day in the landing zone.",
        aws_conn_id=AWS_CONN_ID,
        bucket_name="{{ ti.xcom_pull(task_ids='plan_run')['raw_bucket'] }}",
        bucket_key="{{ ti.xcom_pull(task_ids='plan_run')['raw_key_pattern'] }}",
        wildcard_match=True,
        poke_interval=60,
        timeout=timedelta(hours=12).total_seconds(),
    )

    @task(inlets=[assets.RAW_DROPS], outlets=[assets.SNAPSHOTS])
    def ingest(plan: dict, outlet_events=None) -> dict:
        """Read the day's CSV files into one immutable parquet snapshot (an asset event per day)."""
        snapshot = runtime.ingest(plan)
        outlet_events[assets.SNAPSHOTS].extra = {
            "dataset": plan["dataset"],
            "ds": plan["ds"],
            "uri": snapshot["snapshot_uri"],
            "content_hash": snapshot["content_hash"],
            "rows": snapshot["rows"],
        }
        return snapshot

    validate = SnapshotValidationOperator(
        task_id="validate",
        doc_md="Great Expectations suite of the dataset on the snapshot; quarantines the drop on failure.",
    )

    @task
    def transform(plan: dict) -> dict:
        """Stratified split and preprocessing fitted on the train split only."""
        return runtime.transform(plan)

    @task(pool="training")
    def train(plan: dict, features: dict, validation_uri: str, dag=None, run_id=None) -> dict:
        """Cross-validate the candidates in MLflow and register the best as challenger."""
        return runtime.train(plan, features, validation_uri, dag.dag_id, run_id)

    @task
    def evaluate(plan: dict, features: dict, training: dict, validation_uri: str) -> dict:
        """Score challenger and champion on the same holdout; log metrics, plots and model card."""
        return runtime.evaluate(plan, features, training, validation_uri)

    @task.branch
    def gate(evaluation: dict) -> str:
        """Promote only what passed the rule (or an explicit, logged override)."""
        return "promote_champion" if evaluation["promote"] else "keep_champion"

    @task(outlets=[assets.CHAMPION])
    def promote_champion(plan: dict, evaluation: dict, run_id=None, outlet_events=None) -> dict:
        """Move champion to the challenger, previous_champion to the old champion; log it."""
        promoted = runtime.promote(plan, evaluation, run_id)
        outlet_events[assets.CHAMPION].extra = {
            "model_name": plan["model_name"],
            "version": promoted["champion_version"],
            "previous_version": promoted.get("previous_champion_version"),
            "mlflow_run_id": evaluation["run_id"],
            "ds": plan["ds"],
        }
        return promoted

    @task
    def keep_champion(plan: dict, evaluation: dict, run_id=None) -> dict:
        """Leave the aliases untouched and log why."""
        return runtime.keep_champion(plan, evaluation, run_id)

    features = transform(plan)
    validation_uri = validate.output
    training = with_links(train(plan, features, validation_uri), MLflowRunLink())
    evaluation = with_links(evaluate(plan, features, training, validation_uri), MLflowRunLink())
    chain(plan, [ensure_monitoring_store, wait_for_drop])
    chain(wait_for_drop, ingest(plan), validate, features)
    promoted = promote_champion(plan, evaluation)
    chain(evaluation, gate(evaluation), [promoted, keep_champion(plan, evaluation)])
    chain(promoted, deploy_group(plan))
    chain(ensure_monitoring_store, evaluation)


network_security_training()
