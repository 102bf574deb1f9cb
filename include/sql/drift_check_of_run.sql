-- The drift checks of one drift DAG run (one per dataset checked). Parameter: dag_run_id (named).
SELECT window_start, window_end, champion_version, current_rows, evaluated_rows, reference_rows, max_psi,
       prediction_psi, drifted_features, drift_detected, decision, reason, report_uri, triggered_run_id, dag_run_id,
       dataset
FROM drift_check
WHERE dag_run_id = :dag_run_id;
