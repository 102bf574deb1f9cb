"""
### Network-security deploy and rollback

Ships the registry's `champion` again, or rolls back, through the same `deploy` task
group the training DAG runs after a promotion (ECR image, blue/green rollout on the
tagged EC2 fleet via SSM, the local model server, smoke test, deployment log).

| `action` | what happens first |
| --- | --- |
| `redeploy` | nothing: the current `champion` is deployed (e.g. after the local server was stopped) |
| `rollback` | `champion` moves back to `previous_champion` (the demoted version is tagged `rolled_back` with `reason`), then that version is deployed |

**Trigger**: manually only (UI, `make deploy`, `make rollback`). Params: `action`
(`redeploy` or `rollback`), `reason` (required for a rollback; kept on the model
version and in the logs). A failed deploy here is not rolled back again: the run fails
and says where.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import Param, chain, dag, task

from network_security import alerts, runtime
from network_security.delivery import deploy_group
from tasks.config import DEPLOY_DAG_ID, Settings, task_retry_delay

INCLUDE = Path(__file__).resolve().parent.parent / "include"


@dag(
    dag_id=DEPLOY_DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "on_failure_callback": alerts.on_task_failure,
        "retry_delay": timedelta(seconds=task_retry_delay()),
        "execution_timeout": timedelta(minutes=30),
    },
    tags=["network-security", "deploy", "mlops"],
    template_searchpath=[str(INCLUDE)],
    params={
        "action": Param("redeploy", type="string", enum=["redeploy", "rollback"], description="What to ship"),
        "reason": Param(None, type=["null", "string"], description="Why (required for a rollback)"),
        "dataset": Param(None, type=["null", "string"], description="Dataset spec name; default: the Variable's"),
    },
    render_template_as_native_obj=True,
)
def network_security_deploy():
    @task
    def plan_run(ds=None, params=None, dag_run=None) -> dict:
        """Resolve the model, targets and connections; refuse a rollback without a reason."""
        if params.get("action") == "rollback" and not (params.get("reason") or "").strip():
            raise ValueError("a rollback needs a reason (param `reason`): it is kept on the demoted model version")
        return runtime.plan_run(ds, {"dataset": params.get("dataset")}, dag_run.run_type)

    plan = plan_run()

    ensure_monitoring_store = SQLExecuteQueryOperator(
        task_id="ensure_monitoring_store",
        doc_md="Creates the promotion and deployment logs of the monitoring store if they do not exist.",
        conn_id=Settings().monitoring_conn_id,
        sql="sql/monitoring_store.sql",
        split_statements=True,
    )

    @task
    def choose_release(plan: dict, params=None, run_id=None) -> dict:
        """For a rollback, move champion back to previous_champion; then the champion is the release."""
        return runtime.choose_release(plan, params["action"], params.get("reason"), run_id)

    chain(plan, ensure_monitoring_store, choose_release(plan), deploy_group(plan, rollback_on_failure=False))


network_security_deploy()
