-- The newest drift checks with their PSI and decision (make run's summary).
SELECT window_end, champion_version, current_rows, evaluated_rows, max_psi, prediction_psi, decision, reason, report_uri
FROM drift_check
ORDER BY window_end DESC, checked_at DESC
LIMIT 10;
