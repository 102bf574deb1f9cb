"""Alerts against a local HTTP receiver: what is sent, and that nothing is sent without a webhook."""

from __future__ import annotations

from types import SimpleNamespace

from network_security import alerts


def _context(error: Exception) -> dict:
    ti = SimpleNamespace(
        dag_id="network_security_training", task_id="ingest", run_id="manual__x", try_number=3, log_url="http://ui/log"
    )
    return {"ti": ti, "exception": error}


def test_a_final_failure_posts_what_failed_and_why(webhook):
    alerts.on_task_failure(_context(ValueError("bucket 'raw' does not exist")))

    (body,) = webhook
    assert body["path"] == "/hook"
    assert body["event"] == "task_failed"
    assert (body["dag_id"], body["task_id"], body["run_id"], body["try_number"]) == (
        "network_security_training", "ingest", "manual__x", 3,
    )  # fmt: skip
    assert body["error"] == "ValueError: bucket 'raw' does not exist"
    assert "network_security_training.ingest failed" in body["text"]


def test_nothing_is_sent_without_a_webhook(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_ALERTS_WEBHOOK", raising=False)
    caplog.set_level("DEBUG", logger="network_security.alerts")

    assert alerts.send({"event": "task_failed"}) is False
    assert "no 'alerts_webhook' connection: alert not sent" in caplog.text


def test_an_unreachable_webhook_never_fails_the_task(monkeypatch, caplog):
    from tests.conftest import _free_port

    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", f'{{"conn_type": "http", "host": "{url}"}}')

    alerts.on_task_failure(_context(RuntimeError("boom")))  # no exception

    assert "alert 'task_failed' to connection 'alerts_webhook' not delivered" in caplog.text


def test_a_mapped_task_says_which_dataset_failed(webhook):
    context = _context(RuntimeError("S3 down"))
    context["ti"].task_id, context["ti"].map_index, context["ti"].rendered_map_index = (
        "check_drift",
        1,
        "intrusion_flows",
    )

    alerts.on_task_failure(context)

    (body,) = webhook
    assert body["map_index"] == "intrusion_flows"
    assert "network_security_training.check_drift [intrusion_flows] failed" in body["text"]
