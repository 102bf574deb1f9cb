-- The latest model-quality checks, newest window first: the K-checks-in-a-row rule (same
-- champion version, skipped checks ignored) and make run's loop table (metric before/after,
-- labelled rows). Columns in the order of tasks.quality.LATEST_QUALITY_CHECK_COLUMNS.
SELECT dataset, model_name, window_end, champion_version, labelled_rows, primary_metric, holdout_metric,
       live_metric, degraded, decision, reason, report_uri, triggered_run_id
FROM quality_check
ORDER BY window_end DESC, checked_at DESC
LIMIT 200;
