-- The newest quality check of one dataset in (since, until], skipped checks left out: a drift check
-- that triggers a retrain names a quality drop storm protection held back (one run, both reasons).
-- Parameters: dataset, since, until (named).
SELECT window_end, champion_version, degraded, decision, metrics_json
FROM quality_check
WHERE dataset = :dataset AND window_end > :since AND window_end <= :until AND decision <> 'skipped'
ORDER BY window_end DESC
LIMIT 1;
