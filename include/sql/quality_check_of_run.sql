-- The quality checks of one quality DAG run, one per dataset checked. Parameter: dag_run_id (named).
SELECT dataset, window_start, window_end, champion_version, feedback_rows, labelled_rows, unknown_request_ids,
       primary_metric, holdout_metric, live_metric, degraded, decision, reason, report_uri, triggered_run_id, dag_run_id
FROM quality_check
WHERE dag_run_id = :dag_run_id
ORDER BY dataset;
