"""
### Network-security drift

Watches what every served champion sees and retrains it when its inputs or its predictions
drift. Every hour it checks each onboarded dataset that has a champion (one mapped task group
per dataset, labelled with its name in the grid): the prediction log of the last
`window_hours` hours (only the rows that dataset's champion served) against the champion's
training snapshot, scored by the champion, using Evidently's
`DataDriftPreset(method="psi", threshold=psi_threshold)`: one PSI per feature and one on the
predicted probability. Each dataset has its own thresholds (`include/drift.yaml`, its
`datasets:` overrides), its own consecutive-check history, cooldown and storm guard, and its
retrain goes to its own training DAG.

| step | what it does | output (XCom) |
| --- | --- | --- |
| `plan_check` | per dataset: settings; the datasets to check (every onboarded dataset whose model has a champion, or the `dataset` param's); per dataset `include/drift.yaml` with its overrides (run params override both) and the window from the data interval | plans |
| `ensure_monitoring_store` | creates the monitoring tables (`include/sql/monitoring_store.sql`) if missing, on the plan's connection | |
| `check_drift [<dataset>]` | reads the window column-projected (sampled above `sample_cap` rows) from `predictions/<model>/dt=.../HH/` and the legacy `predictions/dt=.../HH/` (an unreadable object is skipped and counted), finds the champion's snapshot through its MLflow run, runs Evidently; `report.html` + `metrics.json` to `s3://<lake>/drift/<dataset>/<run>/` and a run in the `network_security_monitoring` experiment. Too few rows: **skipped** with the reason | summary |
| `decide_retraining [<dataset>]` | the retrain rule (`tasks/retrain.py`): retrain when a PSI >= threshold in `consecutive_checks` checks in a row, unless a run of *this dataset's* training DAG is queued or running or its cooldown after its last triggered retrain is on; records the check in `drift_check` and a triggered retrain in `retrain_log` | decision |
| `trigger_retraining [<dataset>]` | `TriggerDagRunOperator` on the dataset's training DAG (`network_security_training`, `<dataset>_training`) with `conf` = dataset, reason, signals, report URI, max PSI, drifted features, the newest labelled `ds`; run id `drift__<dataset>__<window end>`, so a retried trigger creates nothing; skipped (saying why) when no retrain was decided | |
| `no_retraining [<dataset>]` | says why not (skipped when a retrain was triggered) | outcome, reason |

**Trigger**: hourly by schedule (`NS_SCHEDULE_NETWORK_SECURITY_DRIFT`: a cron, a preset such as
`@daily`, or `none`), or manually. Params (all optional): `dataset` (check only that one),
`psi_threshold`, `window_hours`, `min_rows`, `cooldown_minutes`.
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
from tasks import drift
from tasks.config import DRIFT_DAG_ID, dag_schedule
from tasks.plan import CheckPlan, plan_checks


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
        "dataset": Param(
            None, type=["null", "string"], description="Check only this dataset; default: every one with a champion"
        ),
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
    def plan_check_task(params=None, data_interval_end=None, dag_run=None) -> list[dict]:
        """Per dataset to check: the settings, its drift configuration and the window."""
        return runtime.plan(plan_checks, params, data_interval_end, dag_run.run_type)

    plan = plan_check_task()

    @task(map_index_template=MAP_INDEX_TEMPLATE)
    def check_drift(plan: dict, run_id=None) -> dict:
        """Evidently PSI of the window against the champion's training data; report to S3 and MLflow."""
        check = CheckPlan.from_xcom(plan)
        label_map_index(check.dataset)
        with runtime.failures():
            return drift.run_check(runtime.s3(check), runtime.store(check), check, run_id)

    @task(task_id="decide_retraining", map_index_template=MAP_INDEX_TEMPLATE)
    def decide_retraining(plan: dict, summary: dict, run_id=None, ti=None) -> str:
        """Retrain rule and storm protection of this dataset; records the check."""
        check = CheckPlan.from_xcom(plan)
        label_map_index(check.dataset)
        active = runtime.active_training_runs(ti, check.dataset)
        decision = drift.decide_retraining(runtime.s3(check), runtime.store(check), check, summary, run_id, active)
        ti.xcom_push(key="decision", value=drift.decision_xcom(check, decision))
        return decision.outcome

    # Exactly one of trigger_retraining and no_retraining runs, the other skips itself (RetrainTrigger says why).
    # One group per dataset; task ids stay unprefixed (check_drift, ...), each labelled with its dataset.
    @task_group(group_id="per_dataset", prefix_group_id=False)
    def per_dataset(plan: dict) -> None:
        summary = with_links(check_drift(plan), EvidentlyReportLink(), MLflowRunLink())
        trigger = RetrainTrigger(
            task_id="trigger_retraining",
            doc_md="Creates the training run of this dataset's drift window on its training DAG (idempotent run id).",
            on_success_callback=alerts.on_retraining_triggered,
        )
        chain(summary, decide_retraining(plan, summary), [trigger, no_retraining()])

    # The plans share their settings (one Variable): the first names the monitoring store.
    chain(plan, ensure_monitoring_store("plan_check", 0), per_dataset.expand(plan=plan))


network_security_drift()
