"""
### Network-security batch scoring

Scores a day's backlog with the champion, for the records nobody sent to the model server
(large-scale, scheduled predictions). Every day it waits for `s3://<raw>/<backlog prefix>/ds=D/`
(`*.csv` or `*.parquet`, the dataset spec's feature columns; the prefix is `include/batch_scoring.yaml`'s)
and scores it in chunks of `chunk_rows` rows, so memory stays flat whatever the backlog's size.

| step | what it does | output (XCom) |
| --- | --- | --- |
| `plan_run` | resolves dataset, day, model and settings (as the training DAG does) | plan |
| `wait_for_backlog` | `S3KeySensor` on the day's backlog folder (deferred where a triggerer runs, else reschedule mode) | |
| `score_backlog` | loads the champion (or the `model_version` param) with the skops loader and builds the model server's own predictor from it (`serving.predictor`), so labels and probabilities are the server's; writes `s3://<lake>/batch_scores/<dataset>/ds=D/predictions/*.parquet` (with the model version), `rejected.parquet` (rows that fail the spec, with the reason) and `manifest.json`, and appends every scored row to the prediction log (`predictions/<model>/dt=.../HH/`, `source: batch`) so the drift and quality checks see it | manifest |

**Idempotent per `ds`**: request ids (`batch-<ds>-<file>:<row>`), log keys and output keys derive
from the day, the file names and the run's data interval end; a rerun overwrites them and
deletes what the previous run of the day wrote and this one did not.

**Trigger**: daily by schedule (`NS_SCHEDULE_NETWORK_SECURITY_BATCH_SCORING`: a cron, a preset,
or `none`), or manually. Params (all optional): `ds` (default: the logical date), `dataset`,
`model_version` (default: the champion), `chunk_rows`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import Param, chain, dag, task

from network_security import runtime
from network_security.dag_parts import default_args, from_plan
from tasks import batch_scoring
from tasks.config import BATCH_SCORING_DAG_ID, dag_schedule
from tasks.plan import RunPlan, plan_run

SENSOR_TIMEOUT = timedelta(hours=12)


@dag(
    dag_id=BATCH_SCORING_DAG_ID,
    schedule=dag_schedule(BATCH_SCORING_DAG_ID, "@daily"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args=default_args(execution_timeout=timedelta(hours=2)),
    tags=["network-security", "batch-scoring", "mlops"],
    params={
        "ds": Param(
            None, type=["null", "string"], format="date", description="Day (YYYY-MM-DD); default: logical date"
        ),
        "dataset": Param(None, type=["null", "string"], description="Dataset spec name; default: the Variable's"),
        "model_version": Param(None, type=["null", "string"], description="Version to score with; default champion"),
        "chunk_rows": Param(None, type=["null", "integer"], minimum=1, description="Rows per chunk (50000)"),
    },
    render_template_as_native_obj=True,
)
def network_security_batch_scoring():
    @task(task_id="plan_run")
    def plan_run_task(ds=None, params=None, dag_run=None) -> dict:
        """Resolve dataset, day, model and settings; add the backlog's folder for the sensor."""
        plan = runtime.plan(plan_run, {"ds": params.get("ds"), "dataset": params.get("dataset")}, ds, dag_run.run_type)
        with runtime.failures():
            plan["backlog"] = batch_scoring.backlog_location(RunPlan.from_xcom(plan), params.get("chunk_rows"))
        return plan

    plan = plan_run_task()

    wait_for_backlog = S3KeySensor(
        task_id="wait_for_backlog",
        doc_md="Waits for at least one backlog file of the day.",
        aws_conn_id=from_plan("settings", "aws_conn_id"),
        bucket_name=from_plan("backlog", "bucket"),
        bucket_key=from_plan("backlog", "key_pattern"),
        wildcard_match=True,
        mode="reschedule",
        poke_interval=60,
        timeout=SENSOR_TIMEOUT.total_seconds(),
    )

    @task
    def score_backlog(plan: dict, params=None, data_interval_end=None) -> dict:
        """Score the day's backlog with the champion in chunks; parquet, rejects, manifest, prediction log."""
        run = RunPlan.from_xcom(plan)
        with runtime.failures():
            return batch_scoring.score_day(
                runtime.s3(run), run, data_interval_end, params.get("model_version"), params.get("chunk_rows")
            )

    chain(plan, wait_for_backlog, score_backlog(plan))


network_security_batch_scoring()
