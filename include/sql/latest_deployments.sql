-- The newest deploys and rollbacks, newest first (make run's summary; the rollback trail).
SELECT recorded_at, action, target, model_name, model_version, status, image_uri, instance_ids, endpoint, detail, dag_run_id
FROM deployment_log
ORDER BY recorded_at DESC
LIMIT 10;
