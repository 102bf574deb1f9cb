-- The newest drift check of one dataset in (since, until], skipped checks left out: a quality check
-- that triggers a retrain names a drift signal storm protection held back (one run, both reasons).
-- Parameters: dataset, since, until (named).
SELECT window_end, drift_detected, decision, max_psi, prediction_psi, drifted_features, report_uri
FROM drift_check
WHERE dataset = :dataset AND window_end > :since AND window_end <= :until AND decision <> 'skipped'
ORDER BY window_end DESC
LIMIT 1;
