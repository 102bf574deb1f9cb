"""The alert payloads (tasks/alerts.py), without Airflow."""

from __future__ import annotations

from tasks import alerts


def test_a_failed_mapped_task_names_its_dataset_and_the_error():
    payload = alerts.task_failed(
        dag_id="network_security_drift",
        task_id="check_drift",
        run_id="scheduled__1",
        try_number=3,
        error=ValueError("bucket 'raw' does not exist"),
        map_label="intrusion_flows",
    )
    assert payload["event"] == "task_failed" and payload["map_index"] == "intrusion_flows"
    assert payload["text"].startswith(":red_circle: network_security_drift.check_drift [intrusion_flows] failed")
    assert payload["error"] == "ValueError: bucket 'raw' does not exist"


def test_an_unmapped_failure_without_an_exception_says_so_and_long_errors_are_cut():
    plain = alerts.task_failed(dag_id="d", task_id="t", run_id="r", try_number=1, error=None)
    assert plain["map_index"] is None and "[" not in plain["text"] and plain["error"] == "unknown error"
    long = alerts.task_failed(dag_id="d", task_id="t", run_id="r", try_number=1, error=RuntimeError("x" * 5000))
    assert len(long["error"]) == 2000 and len(long["text"]) == 3000


def test_a_drift_retrain_names_the_dataset_its_training_dag_and_the_psi():
    decision = {
        "training_dag_id": "intrusion_flows_training",
        "retrain": {"run_id": "drift__intrusion_flows__x", "conf": {"dataset": "intrusion_flows", "reason": "PSI 0.7"}},
    }
    summary = {"champion": {"model_name": "intrusion_flows", "model_version": "4"}, "max_psi": 0.7}
    payload = alerts.drift_retraining("network_security_drift", "scheduled__1", decision, summary)
    assert payload["dataset"] == "intrusion_flows" and payload["training_run_id"] == "drift__intrusion_flows__x"
    assert "intrusion_flows v4" in payload["text"] and "of intrusion_flows_training triggered" in payload["text"]
    assert payload["max_psi"] == 0.7


def test_a_failed_task_instance_is_labelled_by_its_rendered_map_index_or_its_number():
    from types import SimpleNamespace

    ti = SimpleNamespace(dag_id="d", task_id="t", run_id="r", try_number=3, map_index=2, rendered_map_index=None)
    assert alerts.task_failed_of(ti, ValueError("x"))["map_index"] == "2"
    ti.rendered_map_index = "intrusion_flows"
    assert alerts.task_failed_of(ti, None)["text"].startswith(":red_circle: d.t [intrusion_flows] failed in r (try 3)")
    ti.map_index, ti.rendered_map_index, ti.log_url = -1, None, "http://log"
    unmapped = alerts.task_failed_of(ti, None)
    assert unmapped["map_index"] is None and unmapped["log_url"] == "http://log"


def test_an_aborted_release_names_the_model_version_and_the_reasons():
    outcome = {"outcome": "aborted", "stage": "canary_10", "reasons": ["p99 800 ms > 500 ms", "PSI 0.4"]}
    payload = alerts.release_aborted("intrusion_flows", "5", "manual__1", outcome)
    assert payload["event"] == "release_aborted" and payload["dag_run_id"] == "manual__1"
    assert payload["text"] == "intrusion_flows v5: p99 800 ms > 500 ms; PSI 0.4" and payload["stage"] == "canary_10"


def test_a_triggered_retrain_alerts_as_drift_when_the_drift_check_ran_else_as_quality():
    decision = {"training_dag_id": "t", "retrain": {"run_id": "drift__x", "conf": {"dataset": "x", "reason": "psi"}}}
    drift = alerts.retraining_triggered("network_security_drift", "r", decision, {"max_psi": 0.4}, None)
    assert drift["event"] == "drift_retraining_triggered" and drift["max_psi"] == 0.4
    quality = alerts.retraining_triggered("network_security_quality", "r", decision, None, {"model_name": "m"})
    assert quality["event"] == "quality_retraining_triggered" and quality["training_run_id"] == "drift__x"
    assert alerts.retraining_triggered("network_security_quality", "r", None, None, None)["training_run_id"] is None
