"""Alerts: a task that fails for good, and a drift that triggers retraining, post to a webhook.

The webhook is an Airflow HTTP connection, ``alerts_webhook`` by default (the
``NS_ALERTS_CONN_ID`` environment variable names another): its host (with scheme), port and
path, e.g. ``AIRFLOW_CONN_ALERTS_WEBHOOK='{"conn_type": "http", "host": "https://hooks.example.com",
"schema": "", "extra": {}}'`` plus the path as the connection's ``extra.endpoint``. No such
connection: nothing is sent (one debug line). An alert that cannot be delivered is logged
and never fails the task or changes its state.

The payloads (JSON with a ``text`` field and structured fields) are ``tasks/alerts.py``'s.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "alerts_webhook"


def webhook_conn_id() -> str:
    return os.environ.get("NS_ALERTS_CONN_ID", DEFAULT_CONN_ID)


def send(payload: dict[str, Any], conn_id: str | None = None) -> bool:
    """POST ``payload`` to the webhook connection; False when none is configured or delivery failed."""
    from airflow.providers.http.hooks.http import HttpHook
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    conn_id = conn_id or webhook_conn_id()
    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.debug("no %r connection: alert not sent (%s)", conn_id, payload.get("event"))
        return False
    endpoint = (connection.extra_dejson or {}).get("endpoint", "")
    try:
        HttpHook(method="POST", http_conn_id=conn_id).run(
            endpoint,
            data=json.dumps(payload, default=str),
            headers={"Content-Type": "application/json"},
            extra_options={"timeout": 10, "check_response": True},
        )
    except Exception as err:  # an alert must never fail the task it reports on
        log.warning("alert %r to connection %r not delivered: %s", payload.get("event"), conn_id, err)
        return False
    log.info("alert %r sent to connection %r", payload.get("event"), conn_id)
    return True


def on_task_failure(context: dict[str, Any]) -> None:
    """``on_failure_callback`` of every task: runs once the retries are used up."""
    from tasks.alerts import task_failed

    ti = context["ti"]
    mapped = getattr(ti, "map_index", -1)
    label = getattr(ti, "rendered_map_index", None) or (str(mapped) if mapped not in (-1, None) else "")
    send(
        task_failed(
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            try_number=ti.try_number,
            error=context.get("exception"),
            map_label=label,
            log_url=getattr(ti, "log_url", None),
        )
    )


def on_retraining_triggered(context: dict[str, Any]) -> None:
    """``on_success_callback`` of the drift and quality DAGs' ``trigger_retraining``: a retrain triggered."""
    from tasks.alerts import drift_retraining
    from tasks.quality import retraining_alert

    ti = context["ti"]
    decision = ti.xcom_pull(task_ids="decide_retraining", key="decision", map_indexes=ti.map_index) or {}
    drift = ti.xcom_pull(task_ids="check_drift", map_indexes=ti.map_index)
    if drift:
        send(drift_retraining(ti.dag_id, ti.run_id, decision, drift))
    else:  # the quality DAG
        summary = ti.xcom_pull(task_ids="check_quality", map_indexes=ti.map_index) or {}
        send(retraining_alert(ti.dag_id, ti.run_id, summary, decision.get("retrain") or {}))
