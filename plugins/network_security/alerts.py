"""Alerts: a task failed for good, or a drift triggered retraining, POSTs to a webhook.

The webhook is the HTTP connection ``alerts_webhook`` (``NS_ALERTS_CONN_ID`` names another; the path is
its ``extra.endpoint``). No connection: nothing is sent. An undelivered alert never fails the task.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "alerts_webhook"


def send(payload: dict[str, Any], conn_id: str | None = None) -> bool:
    """POST ``payload`` to the webhook connection; False when none is configured or delivery failed."""
    from airflow.providers.http.hooks.http import HttpHook
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    conn_id = conn_id or os.environ.get("NS_ALERTS_CONN_ID", DEFAULT_CONN_ID)
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
    from tasks.alerts import task_failed_of

    send(task_failed_of(context["ti"], context.get("exception")))


def on_retraining_triggered(context: dict[str, Any]) -> None:
    """``on_success_callback`` of the drift and quality DAGs' ``trigger_retraining``: a retrain triggered."""
    from tasks.alerts import retraining_triggered

    ti = context["ti"]
    pulled = [("decide_retraining", "decision"), ("check_drift", "return_value"), ("check_quality", "return_value")]
    values = [ti.xcom_pull(task_ids=task_id, key=key, map_indexes=ti.map_index) for task_id, key in pulled]
    send(retraining_triggered(ti.dag_id, ti.run_id, *values))
