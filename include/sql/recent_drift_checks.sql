-- The latest drift checks, newest window first (the drift DAG's K-consecutive rule and cooldown).
SELECT dataset, window_end, drift_detected, decision, triggered_run_id
FROM drift_check
ORDER BY window_end DESC
LIMIT 200;
