-- The gate decision(s) of one training run. Parameter: dag_run_id (named).
SELECT decided_at, model_name, model_version, decision, primary_metric, challenger_metric,
       champion_version, champion_metric, reason, metrics_json, mlflow_run_id, ds, dag_run_id
FROM promotion_log
WHERE dag_run_id = :dag_run_id;
