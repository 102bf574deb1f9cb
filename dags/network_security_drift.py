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
| `ensure_monitoring_store` | creates the monitoring tables (`include/sql/monitoring_store.sql`) if missing, on the plan's connection | |
| `check_drift` | reads the window column-projected (sampled above `sample_cap` rows) from `predictions/<model>/dt=.../HH/` and the legacy `predictions/dt=.../HH/` (an unreadable object is skipped and counted), finds the champion's snapshot through its MLflow run, runs Evidently; `report.html` + `metrics.json` to `s3://<lake>/drift/<dataset>/<run>/` and a run in the `network_security_monitoring` experiment. Too few rows: **skipped** with the reason. No champion: fails with what to do | summary |
| `decide_retraining` | the retrain rule (`tasks/retrain.py`): retrain when a PSI >= threshold in `consecutive_checks` checks in a row, unless a training run is queued or running or the cooldown after the last triggered retrain is on; records the check in `drift_check` and a triggered retrain in `retrain_log` | decision |
| `trigger_retraining` | `TriggerDagRunOperator` on `network_security_training` with `conf` = reason, signals, report URI, max PSI, drifted features, the newest labelled `ds`; run id `drift__<dataset>__<window end>`, so a retried trigger creates nothing | |
| `no_retraining` | logs why not | |

**Trigger**: hourly by schedule (`NS_SCHEDULE_NETWORK_SECURITY_DRIFT`: a cron, a preset such as
`@daily`, or `none`), or manually. Params (all optional): `dataset`,
`psi_threshold`, `window_hours`, `min_rows`, `cooldown_minutes`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, chain, dag, task

from network_security import alerts, runtime
from network_security.dag_parts import INCLUDE, default_args, ensure_monitoring_store
from network_security.links import EvidentlyReportLink, MLflowRunLink, with_links
from tasks import drift
from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID, dag_schedule
from tasks.plan import plan_check

RETRAIN_RUN_ID = "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['retrain']['run_id'] }}"
RETRAIN_CONF = "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['retrain']['conf'] }}"


@dag(
    dag_id=DRIFT_DAG_ID,
    schedule=dag_schedule(DRIFT_DAG_ID, "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args=default_args(execution_timeout=timedelta(minutes=30)),
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
            description="Quiet time after a triggered retrain (360); 0 lifts it for this run",
        ),
    },
    render_template_as_native_obj=True,
)
def network_security_drift():
    @task(task_id="plan_check")
    def plan_check_task(params=None, data_interval_end=None, dag_run=None) -> dict:
        """Settings, drift configuration and the window of this check."""
        return runtime.plan(plan_check, params, data_interval_end, dag_run.run_type, config=drift.load_drift_config())

    plan = plan_check_task()

    @task
    def check_drift(plan: dict, run_id=None) -> dict:
        """Evidently PSI of the window against the champion's training data; report to S3 and MLflow."""
        check = runtime.check_plan(plan)
        with runtime.failures():
            return drift.run_check(runtime.s3(check), runtime.store(check), check, run_id)

    @task.branch(task_id="decide_retraining")
    def decide_retraining(plan: dict, summary: dict, run_id=None, ti=None) -> str:
        """Retrain rule and storm protection; records the check."""
        check = runtime.check_plan(plan)
        active = runtime.active_training_runs(ti)
        decision = drift.decide_retraining(runtime.s3(check), runtime.store(check), check, summary, run_id, active)
        ti.xcom_push(key="decision", value=decision.as_dict())
        return "trigger_retraining" if decision.trigger else "no_retraining"

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
    chain(plan, ensure_monitoring_store("plan_check"), summary)
    chain(summary, decide_retraining(plan, summary), [trigger_retraining, no_retraining()])


network_security_drift()
