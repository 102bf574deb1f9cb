-- The newest gate decisions, newest first (used by `make run`'s summary and for rollback).
SELECT decided_at, model_name, model_version, decision, primary_metric, challenger_metric,
       champion_version, champion_metric, reason, mlflow_run_id, dag_run_id
FROM promotion_log
ORDER BY decided_at DESC
LIMIT 10;
