-- The window end of the newest retrain a check of this dataset triggered before the window end given, for
-- any reason (the one cooldown). Parameters: dataset, before (named).
SELECT MAX(window_end) AS window_end
FROM retrain_log
WHERE dataset = :dataset AND window_end < :before;
