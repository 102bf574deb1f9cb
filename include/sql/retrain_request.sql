-- The retrain a check triggered, by the training run's id (`make run` executes a queued run
-- with this conf). Parameter: run_id (named).
SELECT run_id, dataset, model_name, signals, reason, conf_json, window_end, source_dag_run_id, requested_at
FROM retrain_log
WHERE run_id = :run_id;
