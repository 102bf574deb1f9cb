-- The drift checks of one dataset before a window end, newest first, skipped checks left out
-- (the drift DAG's K-consecutive-checks rule). Parameters: dataset, before, limit (named).
SELECT window_end, drift_detected, decision, triggered_run_id
FROM drift_check
WHERE dataset = :dataset AND window_end < :before AND decision <> 'skipped'
ORDER BY window_end DESC
LIMIT :limit;
