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
| `plan_check` | one plan per onboarded dataset with a champion (or the `dataset` param's): settings, `include/quality.yaml` (run params override it), the shared cooldown of `include/drift.yaml`, the window end from the data interval | plan |
| `ensure_monitoring_store` | creates the monitoring tables (`include/sql/monitoring_store.sql`) if missing, on the plan's connection | |
| `check_quality` | joins the feedback of the last `feedback_window_days` days with the model's predictions of the last `lookback_days` (late labels; duplicates: latest label wins; unknown request ids counted and ignored); Evidently classification metrics per model version (accuracy, precision, recall, ROC AUC, confusion matrix) against the version's holdout (`test_*` of its MLflow run); `report.html` + `summary.json` to `s3://<lake>/quality/<dataset>/<run>/`, a run in the `network_security_monitoring` experiment. Too few labelled rows: **skipped** with the reason (recorded). No champion: fails with what to do | summary |
| `decide_retraining` | the shared retrain rule: retrain when the primary metric fell by at least `max_drop` (ROC AUC 0.05, accuracy 5 points) in `consecutive_checks` checks in a row, unless a training run is queued or running or the cooldown is on; records the check in `quality_check` and a triggered retrain in `retrain_log` | decision |
| `trigger_retraining` | `TriggerDagRunOperator` on the dataset's training DAG with `conf` = reason (the metric drop), signals, `quality` (metric before/after, labelled rows) and `feedback` (the partitions the run adds to its training data), the newest labelled `ds`; idempotent run id `quality__<dataset>__<window end>` | |
| `no_retraining` | logs why not | |

**Trigger**: daily by schedule (`NS_SCHEDULE_NETWORK_SECURITY_QUALITY`: a cron, a preset, or
`none`), or manually. Params (all optional): `dataset`, `min_labelled_rows`,
`feedback_window_days`, `lookback_days`, `consecutive_checks`, `cooldown_minutes`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, chain, dag, task, task_group

from network_security import alerts, runtime
from network_security.dag_parts import (
    INCLUDE,
    MAP_INDEX_TEMPLATE,
    default_args,
    ensure_monitoring_store,
    label_map_index,
)
from network_security.links import EvidentlyReportLink, MLflowRunLink, with_links
from network_security.operators import RetrainTrigger, no_retraining
from tasks import drift, quality
from tasks.config import QUALITY_DAG_ID, dag_schedule


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
        "dataset": Param(
            None, type=["null", "string"], description="Check only this dataset; default: every one with a champion"
        ),
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
    def plan_check_task(params=None, data_interval_end=None, dag_run=None) -> list[dict]:
        """Per dataset to check: the settings, its quality configuration and the window end."""
        return runtime.plan(quality.plan_quality_checks, params, data_interval_end, dag_run.run_type)

    plan = plan_check_task()

    @task(map_index_template=MAP_INDEX_TEMPLATE)
    def check_quality(plan: dict, run_id=None) -> dict:
        """Live metrics of the labelled predictions against the holdout; report to S3 and MLflow."""
        check = quality.QualityPlan.from_xcom(plan)
        label_map_index(check.dataset)
        with runtime.failures():
            return quality.run_check(runtime.s3(check), runtime.store(check), check, run_id)

    @task(task_id="decide_retraining", map_index_template=MAP_INDEX_TEMPLATE)
    def decide_retraining(plan: dict, summary: dict, run_id=None, ti=None) -> str:
        """Retrain rule and storm protection shared with drift, for this dataset; records the check."""
        check = quality.QualityPlan.from_xcom(plan)
        label_map_index(check.dataset)
        active = runtime.active_training_runs(ti, check.dataset)
        decision = quality.decide_retraining(runtime.s3(check), runtime.store(check), check, summary, run_id, active)
        ti.xcom_push(key="decision", value=drift.decision_xcom(check, decision))
        return decision.outcome

    # One group per dataset; task ids stay unprefixed (check_quality, ...), each labelled with its dataset.
    # Exactly one of trigger_retraining and no_retraining runs, the other skips itself.
    @task_group(group_id="per_dataset", prefix_group_id=False)
    def per_dataset(plan: dict) -> None:
        summary = with_links(check_quality(plan), EvidentlyReportLink(), MLflowRunLink())
        trigger = RetrainTrigger(
            task_id="trigger_retraining",
            doc_md="Creates the training run of this dataset's quality check on its training DAG (idempotent run id).",
            on_success_callback=alerts.on_retraining_triggered,
        )
        chain(summary, decide_retraining(plan, summary), [trigger, no_retraining()])

    # The plans share their settings (one Variable): the first names the monitoring store.
    chain(plan, ensure_monitoring_store("plan_check", 0), per_dataset.expand(plan=plan))


network_security_quality()
