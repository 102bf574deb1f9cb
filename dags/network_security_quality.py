"""
### Network-security model quality

Judges the served champion on the truth that arrives later: the day's feedback drop
(`s3://<raw>/<feedback prefix>/ds=D/*.csv`: request id, true label, when it was labelled; the
shape is the dataset spec's `feedback:`) joined by request id with the prediction log, and
retrains it when its live quality falls below its holdout. This catches concept drift, which
PSI cannot see: P(label | features) moves while the features, and so every PSI, stay put.

**Why a DAG of its own, not a branch of the drift DAG**: labels arrive by the day and late (a
check reads days of prediction log to find what they label), while drift is an hourly look at
the last hours; one schedule would make one of them wrong. The two checks still make *one*
decision: both apply the same retrain rule (`tasks/retrain.py`) with the same storm guard
(one training run at a time, one cooldown for both reasons, counted from `retrain_log`), and a
quality check that triggers names a drift signal that storm protection held back, so drift and
quality together start one run whose `conf` names both (run id `drift+quality__<dataset>__<end>`).

| step | what it does | output (XCom) |
| --- | --- | --- |
| `plan_check` | settings, `include/quality.yaml` (run params override it), the shared cooldown of `include/drift.yaml`, the window end from the data interval | plan |
| `ensure_monitoring_store` | creates the monitoring tables (`include/sql/monitoring_store.sql`) if missing, on the plan's connection | |
| `check_quality` | joins the feedback of the last `feedback_window_days` days with the model's predictions of the last `lookback_days` (late labels; duplicates: latest label wins; unknown request ids counted and ignored); Evidently classification metrics per model version (accuracy, precision, recall, ROC AUC, confusion matrix) against the version's holdout (`test_*` of its MLflow run); `report.html` + `summary.json` to `s3://<lake>/quality/<dataset>/<run>/`, a run in the `network_security_monitoring` experiment. Too few labelled rows: **skipped** with the reason (recorded). No champion: fails with what to do | summary |
| `decide_retraining` | the shared retrain rule: retrain when the primary metric fell by at least `max_drop` (ROC AUC 0.05, accuracy 5 points) in `consecutive_checks` checks in a row, unless a training run is queued or running or the cooldown is on; records the check in `quality_check` and a triggered retrain in `retrain_log` | decision |
| `trigger_retraining` | `TriggerDagRunOperator` on `network_security_training` with `conf` = reason (the metric drop), signals, `quality` (metric before/after, labelled rows) and `feedback` (the partitions the run adds to its training data), the newest labelled `ds`; idempotent run id `quality__<dataset>__<window end>` | |
| `no_retraining` | logs why not | |

**Trigger**: daily by schedule (`NS_SCHEDULE_NETWORK_SECURITY_QUALITY`: a cron, a preset, or
`none`), or manually. Params (all optional): `dataset`, `min_labelled_rows`,
`feedback_window_days`, `lookback_days`, `consecutive_checks`, `cooldown_minutes`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, chain, dag, task

from network_security import alerts, runtime
from network_security.dag_parts import INCLUDE, default_args, ensure_monitoring_store
from network_security.links import EvidentlyReportLink, MLflowRunLink, with_links
from tasks import quality
from tasks.config import QUALITY_DAG_ID, TRAINING_DAG_ID, dag_schedule

RETRAIN_RUN_ID = "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['retrain']['run_id'] }}"
RETRAIN_CONF = "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['retrain']['conf'] }}"


@dag(
    dag_id=QUALITY_DAG_ID,
    schedule=dag_schedule(QUALITY_DAG_ID, "@daily"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args=default_args(execution_timeout=timedelta(minutes=30)),
    tags=["network-security", "monitoring", "quality", "mlops"],
    template_searchpath=[str(INCLUDE)],
    params={
        "dataset": Param(None, type=["null", "string"], description="Dataset spec name; default: the Variable's"),
        "min_labelled_rows": Param(
            None, type=["null", "integer"], minimum=1, description="Fewer labelled rows: skip the check (200)"
        ),
        "feedback_window_days": Param(
            None, type=["null", "integer"], minimum=1, maximum=90, description="Days of feedback drops (1)"
        ),
        "lookback_days": Param(
            None, type=["null", "integer"], minimum=1, maximum=90, description="How late a label may be (7)"
        ),
        "consecutive_checks": Param(
            None, type=["null", "integer"], minimum=1, description="Degraded checks in a row to retrain (1)"
        ),
        "cooldown_minutes": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            description="Quiet time after a triggered retrain, shared with drift (360); 0 lifts it for this run",
        ),
    },
    render_template_as_native_obj=True,
)
def network_security_quality():
    @task(task_id="plan_check")
    def plan_check_task(params=None, data_interval_end=None, dag_run=None) -> dict:
        """Settings, quality configuration and the window end of this check."""
        return runtime.plan(quality.plan_quality_check, params, data_interval_end, dag_run.run_type)

    plan = plan_check_task()

    @task
    def check_quality(plan: dict, run_id=None) -> dict:
        """Live metrics of the labelled predictions against the holdout; report to S3 and MLflow."""
        check = quality.QualityPlan.from_xcom(plan)
        with runtime.failures():
            return quality.run_check(runtime.s3(check), runtime.store(check), check, run_id)

    @task.branch(task_id="decide_retraining")
    def decide_retraining(plan: dict, summary: dict, run_id=None, ti=None) -> str:
        """Retrain rule and storm protection shared with drift; records the check."""
        check = quality.QualityPlan.from_xcom(plan)
        active = runtime.active_training_runs(ti)
        decision = quality.decide_retraining(runtime.s3(check), runtime.store(check), check, summary, run_id, active)
        ti.xcom_push(key="decision", value=decision.as_dict())
        return "trigger_retraining" if decision.trigger else "no_retraining"

    trigger_retraining = TriggerDagRunOperator(
        task_id="trigger_retraining",
        doc_md="Creates the training run for this quality check (idempotent run id).",
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

    summary = with_links(check_quality(plan), EvidentlyReportLink(), MLflowRunLink())
    chain(plan, ensure_monitoring_store("plan_check"), summary)
    chain(summary, decide_retraining(plan, summary), [trigger_retraining, no_retraining()])


network_security_quality()
