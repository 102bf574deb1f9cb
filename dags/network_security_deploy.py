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

import pendulum
from airflow.sdk import Param, chain, dag, task

from network_security import runtime
from network_security.dag_parts import INCLUDE, default_args, ensure_monitoring_store
from network_security.release import deploy_group
from tasks import delivery
from tasks.config import DEPLOY_DAG_ID
from tasks.plan import RunPlan, plan_release


@dag(
    dag_id=DEPLOY_DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args=default_args(execution_timeout=timedelta(minutes=30)),
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
        return runtime.plan(plan_release, params, ds, dag_run.run_type)

    @task(pool="aliases")  # every alias move, one at a time (the release completion too)
    def choose_release(plan: dict, run_id=None) -> dict:
        """For a rollback, move champion back to previous_champion; then the champion is the release."""
        with runtime.failures():
            return delivery.choose_release(RunPlan.from_xcom(plan), run_id)

    plan = plan_run()
    chain(plan, ensure_monitoring_store(), choose_release(plan), deploy_group(plan))


network_security_deploy()
