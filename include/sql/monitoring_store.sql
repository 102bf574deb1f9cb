-- Monitoring store: the promotion log (one row per gate decision), the deployment log
-- (one row per target per deploy or rollback) and the drift checks (one row per check).
-- Portable DDL (SQLite in embedded mode, Postgres in compose); run by the
-- `ensure_monitoring_store` task with SQLExecuteQueryOperator before anything writes.
CREATE TABLE IF NOT EXISTS promotion_log (
    dag_run_id          TEXT NOT NULL,
    model_name          TEXT NOT NULL,
    model_version       TEXT NOT NULL,
    mlflow_run_id       TEXT NOT NULL,
    ds                  TEXT NOT NULL,
    decision            TEXT NOT NULL,      -- promote | reject | forced_promote | forced_reject
    reason              TEXT NOT NULL,
    primary_metric      TEXT NOT NULL,
    challenger_metric   DOUBLE PRECISION,
    champion_version    TEXT,
    champion_metric     DOUBLE PRECISION,
    metrics_json        TEXT NOT NULL,
    decided_at          TEXT NOT NULL,      -- ISO 8601, UTC
    PRIMARY KEY (dag_run_id, model_version)
);

CREATE TABLE IF NOT EXISTS deployment_log (
    deployment_id       TEXT NOT NULL,      -- <dag_run_id>/<target>/<action>
    dag_run_id          TEXT NOT NULL,
    action              TEXT NOT NULL,      -- deploy | rollback
    target              TEXT NOT NULL,      -- local | ec2
    model_name          TEXT NOT NULL,
    model_version       TEXT NOT NULL,
    image_uri           TEXT,
    instance_ids        TEXT,               -- JSON list (ec2)
    endpoint            TEXT,               -- URL (local)
    status              TEXT NOT NULL,      -- deployed | rolled_back | rollback_failed
    detail              TEXT NOT NULL,
    recorded_at         TEXT NOT NULL,      -- ISO 8601, UTC
    PRIMARY KEY (deployment_id)
);

CREATE TABLE IF NOT EXISTS drift_check (
    dag_run_id          TEXT NOT NULL,
    dataset             TEXT NOT NULL,
    model_name          TEXT NOT NULL,
    champion_version    TEXT,
    window_start        TEXT NOT NULL,      -- ISO 8601, UTC (first hour partition)
    window_end          TEXT NOT NULL,      -- ISO 8601, UTC (the run's data interval end)
    current_rows        BIGINT,
    evaluated_rows      BIGINT,             -- < current_rows when Evidently got a sample
    reference_rows      BIGINT,
    max_psi             DOUBLE PRECISION,
    prediction_psi      DOUBLE PRECISION,
    drifted_features    TEXT NOT NULL,      -- JSON list
    drift_detected      INTEGER NOT NULL,   -- 0 | 1
    decision            TEXT NOT NULL,      -- retrain | no_drift | drift_pending | training_active | cooldown | skipped | no_labelled_data
    reason              TEXT NOT NULL,
    report_uri          TEXT,
    triggered_run_id    TEXT,
    checked_at          TEXT NOT NULL,
    PRIMARY KEY (dag_run_id, dataset)  -- one row per dataset a drift run checks
);

-- Model-quality checks: delayed labels joined to the prediction log, one row per check
-- (tasks/quality.py quality_check_row builds it; latest_quality_checks.sql reads it back).
CREATE TABLE IF NOT EXISTS quality_check (
    dag_run_id             TEXT NOT NULL,
    dataset                TEXT NOT NULL,
    model_name             TEXT NOT NULL,
    champion_version       TEXT,
    window_start           TEXT,               -- ISO 8601, UTC (start of the first feedback day)
    window_end             TEXT,               -- ISO 8601, UTC (the run's data interval end)
    feedback_rows          BIGINT,             -- valid feedback rows read (before deduplication)
    labelled_rows          BIGINT,             -- champion predictions joined with a label
    duplicate_labels       BIGINT,             -- labels superseded by a later one (latest labelled_at wins)
    unknown_request_ids    BIGINT,             -- labels matching no prediction in the window (ignored)
    invalid_feedback_rows  BIGINT,             -- rows without id, with an unknown label or a bad time
    primary_metric         TEXT,
    holdout_metric         DOUBLE PRECISION,   -- the champion's test_<primary_metric> from its MLflow run
    live_metric            DOUBLE PRECISION,
    accuracy               DOUBLE PRECISION,   -- live, the champion's
    precision              DOUBLE PRECISION,
    recall                 DOUBLE PRECISION,
    roc_auc                DOUBLE PRECISION,
    degraded               INTEGER NOT NULL,   -- 0 | 1
    decision               TEXT NOT NULL,      -- retrain | no_degradation | degradation_pending | training_active | cooldown | skipped | no_labelled_data
    reason                 TEXT NOT NULL,
    metrics_json           TEXT NOT NULL,      -- per version: rows, metrics, comparison with the holdout
    report_uri             TEXT,
    triggered_run_id       TEXT,
    checked_at             TEXT NOT NULL,
    PRIMARY KEY (dag_run_id, dataset)  -- one row per dataset a quality run checks
);

-- One row per training run a check triggered, whatever the signal (drift today; live quality
-- later): the one cooldown counts from the newest window_end here, and `make run` reads the
-- queued run's conf back from it. Written by the deciding task before the trigger runs.
CREATE TABLE IF NOT EXISTS retrain_log (
    run_id              TEXT NOT NULL,      -- the training run's (idempotent) id
    dataset             TEXT NOT NULL,
    model_name          TEXT NOT NULL,
    signals             TEXT NOT NULL,      -- JSON list: drift, ...
    reason              TEXT NOT NULL,
    conf_json           TEXT NOT NULL,      -- the training run's conf
    window_end          TEXT NOT NULL,      -- ISO 8601, UTC: the deciding check's window end
    source_dag_run_id   TEXT NOT NULL,      -- the check that decided
    requested_at        TEXT NOT NULL,      -- ISO 8601, UTC
    PRIMARY KEY (run_id)
);
