-- The deploy and rollback rows of one DAG run, one per target. Parameter: dag_run_id (named).
SELECT recorded_at, action, target, model_name, model_version, status, image_uri, instance_ids, endpoint, detail, dag_run_id
FROM deployment_log
WHERE dag_run_id = :dag_run_id
ORDER BY target;
