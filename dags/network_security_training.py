"""
### Network-security training

Keeps the phishing classifier current, and every other onboarded dataset's model: one DAG per
spec in `include/datasets/` (`network_security_training`, `<dataset>_training`), the same steps,
one run at a time per dataset, its training in its own pool. Every day it waits for the day's labelled
drop in the raw bucket, snapshots and validates it, builds the features, trains
candidate models tracked in MLflow and promotes the best one only if it beats the
gate against the current champion.

| step | what it does | output (XCom) |
| --- | --- | --- |
| `plan_run` | resolves dataset, day, window, buckets, MLflow and the trigger from the `network_security_config` Variable and the run's params | plan |
| `ensure_monitoring_store` | creates the monitoring store's tables (`include/sql/monitoring_store.sql`) if missing, on the plan's connection | |
| `wait_for_drop` | `S3KeySensor` on `s3://<raw>/<raw_prefix>/ds=<ds>/*.csv`: deferred to the triggerer when `[operators] default_deferrable` is on, else in reschedule mode (no worker slot held between pokes) | |
| `ingest` | reads every CSV of the day, coerces dtypes, counts duplicates, writes `snapshots/<dataset>/ds=<ds>/data.parquet` + manifest with the content hash | snapshot URI + hash |
| `validate` | the dataset's GX suite (`include/expectations/`) via the GX provider; result JSON + report to `validation/`; on failure the drop is copied to `quarantine/` with the reason and the run stops | result URI |
| `transform` | stratified split (fixed seed) of the last `window_days` snapshots, preprocessing fitted on train only, written to `features/<dataset>/ds=<ds>/` | feature URIs |
| `start_training` | opens the parent MLflow run: params, training input, lineage, dataset spec | one assignment per candidate (name + parent run) |
| `train_candidate` | mapped, one per candidate of `include/training.yaml`, side by side: CV (on a stratified subsample above `cv_max_rows`), each its own nested MLflow run | CV metrics |
| `train` | the best candidate by CV refitted on the whole train split (preprocessing + estimator, skops), logged in the parent run, registered as alias `challenger` | run id, version |
| `evaluate` | challenger and champion scored on the same test split; metrics, plots and model card logged to the run | decision + reasons |
| `gate` | branches on the decision (rule in `include/training.yaml`: floor and tolerance on the primary metric) | |
| `keep_champion` | leaves both aliases untouched, logs the reasons, row in the promotion log | reasons |
| `release.*` | the gate's candidate on live evidence (`include/deploy.yaml`): optional human approval (`approve_release`), image in ECR, the candidate beside the baseline (`deploy_candidate`), `shadow`, `canary_10/50/100` (reschedule sensors reading live metrics), `complete` moves `champion` (compare-and-swap, pool `aliases`); a failed stage runs `abort` (weight 0, baseline serves, champion untouched, logged, alerted); `outcome` says what happened | verdicts, outcome |

Each dataset's pool (`training_<dataset>`) has as many slots as there are candidates: with
`max_active_runs=1` one run's candidates run side by side, no more training tasks of that
dataset than one run's at once anywhere, and another dataset's training never waits for it.

Bad data fails fast (no retries) and is quarantined; infrastructure errors (S3, MLflow)
are retried. A rejected challenger ends the run successfully with `release.*` skipped; `champion` moves only in `release.complete`.

**Trigger**: daily by schedule (`NS_SCHEDULE_NETWORK_SECURITY_TRAINING`), manually, or by the drift DAG. Params (all optional):
`ds` (default: the logical date), `dataset` (fixed to the DAG's), `window_days` (train on the last N days),
`reason` / `drift_report_uri` / `max_psi` / `drifted_features` (recorded on the MLflow run),
`force_gate` (`promote` or `reject`) with a mandatory `force_reason`, logged in the
model card and the promotion log; `smoke_min_accuracy` (default from `include/deploy.yaml`).
Which targets a release ships to is the `deploy_targets` setting (`local,ec2`). The run conf
`release_fault` (`{"error_rate": 0.5}` or `{"latency_ms": 800}`) makes the candidate fail or slow
down during its canary steps: a deliberately bad release, accepted only by a model server started
with `NS_SERVING_FAULT_INJECTION=true` (off by default; `make run` turns it on).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import DAG, Param, chain, dag, get_current_context, task

from network_security import assets, runtime
from network_security.dag_parts import INCLUDE, default_args, ensure_monitoring_store, from_plan
from network_security.links import MLflowRunLink, with_links
from network_security.operators import SnapshotValidationOperator
from network_security.release import release_group
from tasks import pipeline
from tasks.config import dag_schedule, training_dag_id, training_pool
from tasks.dataset_spec import available_datasets
from tasks.plan import RunPlan, plan_run

SENSOR_TIMEOUT = timedelta(hours=12)
# The pool the body's training tasks name; each dataset's DAG swaps in its own (see below).
TRAINING_POOL = "training"


def network_security_training():
    @task(task_id="plan_run")
    def plan_run_task(ds=None, params=None, dag_run=None) -> dict:
        """Resolve dataset, day, window, buckets, MLflow and trigger for this run."""
        return runtime.plan(plan_run, params, ds, dag_run.run_type)

    plan = plan_run_task()

    # Reschedule mode where nothing defers (dag.test, no triggerer): no worker slot is held
    # between pokes, and the 1 h execution_timeout bounds one poke, not the 12 h wait.
    wait_for_drop = S3KeySensor(
        task_id="wait_for_drop",
        doc_md="Waits for at least one CSV of the day in the landing zone.",
        aws_conn_id=from_plan("settings", "aws_conn_id"),
        bucket_name=from_plan("settings", "raw_bucket"),
        bucket_key=from_plan("raw_key_pattern"),
        wildcard_match=True,
        mode="reschedule",
        poke_interval=60,
        timeout=SENSOR_TIMEOUT.total_seconds(),
    )

    @task(inlets=[assets.RAW_DROPS], outlets=[assets.SNAPSHOTS])
    def ingest(plan: dict, outlet_events=None) -> dict:
        """Read the day's CSV files into one immutable parquet snapshot (an asset event per day)."""
        run = RunPlan.from_xcom(plan)
        with runtime.failures(run):
            snapshot = pipeline.ingest(run, runtime.s3(run))
        outlet_events[assets.SNAPSHOTS].extra = pipeline.snapshot_event(run, snapshot)
        return snapshot

    validate = SnapshotValidationOperator(
        task_id="validate",
        doc_md="Great Expectations suite of the dataset on the snapshot; quarantines the drop on failure.",
    )

    @task
    def transform(plan: dict) -> dict:
        """Stratified split and preprocessing fitted on the train split only."""
        run = RunPlan.from_xcom(plan)
        return pipeline.transform(run, runtime.s3(run))

    @task
    def start_training(plan: dict, features: dict, validation_uri: str, dag=None, run_id=None) -> list[dict]:
        """Open the parent MLflow run (lineage, spec, params); one assignment per candidate."""
        run = RunPlan.from_xcom(plan)
        return pipeline.start_training(run, runtime.s3(run), features, validation_uri, dag.dag_id, run_id)

    # One mapped task per candidate of include/training.yaml: side by side on as many
    # workers as there are, each in its own slot of the dataset's training pool (slots = candidates).
    @task(pool=TRAINING_POOL, map_index_template="{{ candidate_name }}")
    def train_candidate(plan: dict, features: dict, assignment: dict) -> dict:
        """Cross-validate one candidate in its nested MLflow run under the parent run."""
        get_current_context()["candidate_name"] = assignment["candidate"]  # the map index's name in the UI
        run = RunPlan.from_xcom(plan)
        return pipeline.train_candidate(run, runtime.s3(run), features, assignment)

    @task(task_id="train", pool=TRAINING_POOL)
    def register_best(plan: dict, features: dict, validation_uri: str, assignments: list, candidates) -> dict:
        """Refit the best candidate on the whole train split and register it as challenger."""
        run = RunPlan.from_xcom(plan)
        # By index up to len(): iterating the lazy sequence reads one past its end (an error in the log).
        scored = [candidates[i] for i in range(len(candidates))]
        return pipeline.register_best(run, runtime.s3(run), features, validation_uri, assignments, scored)

    @task
    def evaluate(plan: dict, features: dict, training: dict, validation_uri: str) -> dict:
        """Score challenger and champion on the same holdout; log metrics, plots and model card."""
        run = RunPlan.from_xcom(plan)
        with runtime.failures(run):
            return pipeline.evaluate(run, runtime.s3(run), features, training, validation_uri)

    @task.branch
    def gate(evaluation: dict) -> str:
        """A challenger that passed the rule (or an explicit, logged override) becomes a release candidate."""
        return "release.candidate" if evaluation["promote"] else "keep_champion"

    @task
    def keep_champion(plan: dict, evaluation: dict, run_id=None) -> dict:
        """Leave the aliases untouched and log why."""
        run = RunPlan.from_xcom(plan)
        return pipeline.keep_champion(run, runtime.store(run), evaluation, run_id)

    ensure_store = ensure_monitoring_store()
    features = transform(plan)
    validation_uri = validate.output
    assignments = start_training(plan, features, validation_uri)
    scored = train_candidate.partial(plan=plan, features=features).expand(assignment=assignments)
    training = with_links(register_best(plan, features, validation_uri, assignments, scored), MLflowRunLink())
    evaluation = with_links(evaluate(plan, features, training, validation_uri), MLflowRunLink())
    chain(plan, [ensure_store, wait_for_drop])
    chain(wait_for_drop, ingest(plan), validate, features)
    released = release_group(plan, evaluation)
    chain(evaluation, gate(evaluation), [released, keep_champion(plan, evaluation)])
    chain(ensure_store, evaluation)


def training_params(dataset: str) -> dict[str, Param]:
    """The run params of ``dataset``'s training DAG (``dataset`` fixed to it: a DAG trains one dataset)."""
    return {
        "ds": Param(
            None, type=["null", "string"], format="date", description="Day (YYYY-MM-DD); default: logical date"
        ),
        "dataset": Param(dataset, type="string", enum=[dataset], description="The dataset this DAG trains"),
        "window_days": Param(1, type="integer", minimum=1, maximum=90, description="Train on the last N days"),
        "reason": Param(None, type=["null", "string"], description="Why this run was triggered (drift, operator)"),
        "signals": Param([], type="array", description="Retrain signals that triggered this run (drift, ...)"),
        "drift_report_uri": Param(None, type=["null", "string"], description="Evidently report behind a drift run"),
        "max_psi": Param(None, type=["null", "number"], description="Largest PSI seen by the drift check"),
        "drifted_features": Param([], type="array", description="Features past the PSI threshold"),
        "quality": Param(
            None,
            type=["null", "object"],
            description="The live-quality drop behind a quality run (metric, labelled rows)",
        ),
        "feedback": Param(
            None,
            type=["null", "object"],
            description="Labelled feedback partitions a quality-triggered run adds to its training data",
        ),
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
    }


def training_dag(dataset: str) -> DAG:
    """The training DAG of one dataset: the body above, its own id, schedule, params and pool.

    One DAG per dataset (not a mapped group in one DAG) so ``max_active_runs=1`` holds per
    dataset: dataset A's retrain never queues behind B's, and the drift DAG's storm guard
    counts the runs of that dataset only. Its training tasks take the dataset's own pool
    (``training_<dataset>``, a slot per candidate, in ``airflow_settings.yaml``) instead of the
    shared ``training`` pool the body names, for the same reason.
    """
    dag_id = training_dag_id(dataset)
    built = dag(
        dag_id=dag_id,
        schedule=dag_schedule(dag_id, "@daily"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        doc_md=__doc__,
        default_args=default_args(execution_timeout=timedelta(hours=1)),
        tags=["network-security", "training", "mlops", f"dataset:{dataset}"],
        template_searchpath=[str(INCLUDE)],
        params=training_params(dataset),
        render_template_as_native_obj=True,
    )(network_security_training)()
    for each in built.tasks:
        if each.pool == TRAINING_POOL:
            each.pool = training_pool(dataset)
    return built


# Parse-time I/O: the names of the spec files under include/datasets/, nothing else.
for _dataset in available_datasets():
    training_dag(_dataset)
