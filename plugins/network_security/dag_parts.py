"""What every DAG file shares: ``default_args``, the monitoring store's DDL task, templates of the plan, steps.

Operators read connection ids from the run plan at run time (templates): nothing here reads settings at parse time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import get_current_context, task

from network_security import alerts, runtime
from tasks.config import task_retry_delay
from tasks.plan import RunPlan

INCLUDE = Path(__file__).resolve().parents[2] / "include"
OWNER = "ml-platform"


def default_args(execution_timeout: timedelta) -> dict[str, Any]:
    """Owner, 2 retries with the configured delay, the failure alert, and a time limit per try."""
    return {
        "owner": OWNER,
        "retries": 2,
        "retry_delay": timedelta(seconds=task_retry_delay()),
        "on_failure_callback": alerts.on_task_failure,
        "execution_timeout": execution_timeout,
    }


def from_plan(*path: str | int, plan_task_id: str = "plan_run") -> str:
    """A template of one value of the plan in XCom, e.g. ``from_plan("settings", "aws_conn_id")``."""
    keys = "".join(f"[{key!r}]" for key in path)
    return f"{{{{ ti.xcom_pull(task_ids={plan_task_id!r}){keys} }}}}"


def step(task_id: str, call: Callable[..., Any], **task_args: Any) -> Any:
    """A task running ``call`` (a step of ``tasks/``) through ``runtime.call``; its doc is ``call``'s docstring, and
    each key of the mapping it returns is an XCom too (as for a ``-> dict`` task).

    ``step("ec2_fleet", delivery.fleet)(plan, release, image)``: ``fleet(plan, ec2, ssm, region, release,
    image)`` on the run plan, the plan's ``ec2``/``ssm`` clients and region, and the two upstream values.
    """

    @task(task_id=task_id, doc_md=call.__doc__, multiple_outputs=True, **task_args)
    def run_step(plan: dict, *values: Any) -> Any:
        run = RunPlan.from_xcom(plan)
        with runtime.failures(run):
            return runtime.call(call, run, *values)

    return run_step


def ensure_monitoring_store(plan_task_id: str = "plan_run", *within: str | int) -> Any:
    """``SQLExecuteQueryOperator`` creating the monitoring tables if missing, on the plan's connection
    (``within``: where ``settings`` sits in that XCom, e.g. ``0``: the first of a list of plans)."""
    from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator

    return SQLExecuteQueryOperator(
        task_id="ensure_monitoring_store",
        doc_md="Creates the promotion, deployment, drift-check and retrain logs of the monitoring store if missing.",
        conn_id=from_plan(*within, "settings", "monitoring_conn_id", plan_task_id=plan_task_id),
        sql="sql/monitoring_store.sql",
        split_statements=True,
    )


# One mapped task group per dataset (drift, quality): each task labels its map index with the dataset.
MAP_INDEX_TEMPLATE = "{{ dataset }}"


def label_map_index(dataset: str) -> None:
    """Name this mapped task instance after its dataset in the grid (``map_index_template=MAP_INDEX_TEMPLATE``)."""
    get_current_context()["dataset"] = dataset  # type: ignore[index]
