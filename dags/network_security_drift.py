"""
### Network-security drift

Watches what the served champion sees and retrains it when its inputs or its predictions
drift. Every hour it compares the prediction log of the last `window_hours` hours (only the
rows the champion served) with the champion's training snapshot, scored by the champion,
using Evidently's `DataDriftPreset(method="psi", threshold=psi_threshold)`: one PSI per
feature and one on the predicted probability.

| step | what it does | output (XCom) |
| --- | --- | --- |
| `plan_check` | settings, `include/drift.yaml` (run params override it), the window from the data interval | plan |
| `ensure_monitoring_store` | creates the monitoring tables (`include/sql/monitoring_store.sql`) if missing | |
| `check_drift` | reads the window column-projected (sampled above `sample_cap` rows), finds the champion's snapshot through its MLflow run, runs Evidently; `report.html` + `metrics.json` to `s3://<lake>/drift/<dataset>/<run>/` and a run in the `network_security_monitoring` experiment. Too few rows: **skipped** with the reason. No champion: fails with what to do | summary |
| `decide_retraining` | retrain when a PSI >= threshold in `consecutive_checks` checks in a row, unless a training run is queued or running or the cooldown after the last drift-triggered retrain is on; records the check in `drift_check` | decision |
| `trigger_retraining` | `TriggerDagRunOperator` on `network_security_training` with `conf` = reason, report URI, max PSI, drifted features, the newest labelled `ds`; run id `drift__<dataset>__<window end>`, so a retried trigger creates nothing | |
| `no_retraining` | logs why not | |

**Trigger**: hourly by schedule (`NS_SCHEDULE_NETWORK_SECURITY_DRIFT`: a cron, a preset such as
`@daily`, or `none`), or manually. Params (all optional): `dataset`,
`psi_threshold`, `window_hours`, `min_rows`, `cooldown_minutes`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, chain, dag, task

from network_security import alerts, monitoring
from network_security.links import EvidentlyReportLink, MLflowRunLink, with_links
from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID, Settings, dag_schedule, task_retry_delay

INCLUDE = Path(__file__).resolve().parent.parent / "include"
RETRAIN_RUN_ID = "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['retrain']['run_id'] }}"
RETRAIN_CONF = "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['retrain']['conf'] }}"


@dag(
    dag_id=DRIFT_DAG_ID,
    schedule=dag_schedule(DRIFT_DAG_ID, "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "on_failure_callback": alerts.on_task_failure,
        "retry_delay": timedelta(seconds=task_retry_delay()),
        "execution_timeout": timedelta(minutes=30),
    },
    tags=["network-security", "monitoring", "drift", "mlops"],
    template_searchpath=[str(INCLUDE)],
    params={
        "dataset": Param(None, type=["null", "string"], description="Dataset spec name; default: the Variable's"),
        "psi_threshold": Param(
            None, type=["null", "number"], exclusiveMinimum=0, description="PSI at which a column drifts (0.25)"
        ),
        "window_hours": Param(
            None, type=["null", "integer"], minimum=1, maximum=24 * 31, description="Hours of predictions (24)"
        ),
        "min_rows": Param(None, type=["null", "integer"], minimum=1, description="Fewer rows: skip the check (500)"),
        "cooldown_minutes": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            description="Quiet time after a drift-triggered retrain (360); 0 lifts it for this run",
        ),
    },
    render_template_as_native_obj=True,
)
def network_security_drift():
    @task
    def plan_check(params=None, data_interval_end=None, dag_run=None) -> dict:
        """Settings, drift configuration and the window of this check."""
        return monitoring.plan_check(params, data_interval_end, dag_run.run_type)

    plan = plan_check()

    ensure_monitoring_store = SQLExecuteQueryOperator(
        task_id="ensure_monitoring_store",
        doc_md="Creates the drift-check, promotion and deployment tables of the monitoring store if missing.",
        conn_id=Settings().monitoring_conn_id,
        sql="sql/monitoring_store.sql",
        split_statements=True,
    )

    @task
    def check_drift(plan: dict, run_id=None) -> dict:
        """Evidently PSI of the window against the champion's training data; report to S3 and MLflow."""
        return monitoring.check_drift(plan, run_id)

    @task.branch(task_id="decide_retraining")
    def decide_retraining(plan: dict, summary: dict, run_id=None, ti=None) -> str:
        """Retrain rule and storm protection; records the check."""
        decision = monitoring.decide(plan, summary, run_id, monitoring.active_training_runs(ti))
        ti.xcom_push(key="decision", value=decision)
        return "trigger_retraining" if decision["trigger"] else "no_retraining"

    trigger_retraining = TriggerDagRunOperator(
        task_id="trigger_retraining",
        doc_md="Creates the training run for this drift window (idempotent run id).",
        trigger_dag_id=TRAINING_DAG_ID,
        trigger_run_id=RETRAIN_RUN_ID,
        conf=RETRAIN_CONF,
        skip_when_already_exists=True,
        wait_for_completion=False,
        on_success_callback=alerts.on_retraining_triggered,
    )

    @task
    def no_retraining(ti=None) -> dict:
        """Say why no training run was triggered."""
        decision = ti.xcom_pull(task_ids="decide_retraining", key="decision")
        return {"outcome": decision["outcome"], "reason": decision["reason"]}

    summary = with_links(check_drift(plan), EvidentlyReportLink(), MLflowRunLink())
    chain(plan, ensure_monitoring_store, summary)
    chain(summary, decide_retraining(plan, summary), [trigger_retraining, no_retraining()])


network_security_drift()
