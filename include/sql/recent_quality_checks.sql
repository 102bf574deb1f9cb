-- The quality checks of one dataset and model before a window end, newest first, skipped checks
-- left out (the quality DAG's K-checks-in-a-row rule: tasks.quality.performance_signal).
-- Parameters: dataset, model_name, before, limit (named).
SELECT window_end, champion_version, degraded, decision, triggered_run_id
FROM quality_check
WHERE dataset = :dataset AND model_name = :model_name AND window_end < :before AND decision <> 'skipped'
ORDER BY window_end DESC
LIMIT :limit;
