"""``make deploy`` / ``make rollback``: run the ``network_security_deploy`` DAG on the embedded stack.

Usage: ``python -m scripts.deploy redeploy`` or ``python -m scripts.deploy rollback --reason "..."``.
The same deploy task group the training DAG runs after a promotion does the work; what it did is
read back from the deployment log of the monitoring store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from scripts import bootstrap
from scripts.services import Paths
from tasks.supervisor import SupervisorError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["redeploy", "rollback"])
    parser.add_argument("--reason", default="", help="why (required for a rollback; kept on the demoted version)")
    args = parser.parse_args(argv)
    if args.action == "rollback" and not args.reason.strip():
        parser.error('a rollback needs a reason: make rollback REASON="..."')

    paths = Paths.from_env()
    try:
        os.environ.update(bootstrap.up(paths))
    except (SupervisorError, RuntimeError) as err:
        print(f"stack: {err}", file=sys.stderr)
        return 2
    from scripts.dag_runner import run_dag, task_states
    from scripts.run_pipeline import Records
    from tasks.config import DEPLOY_DAG_ID

    log_path = paths.logs / f"{DEPLOY_DAG_ID}.log"
    conf = {"action": args.action, "reason": args.reason or None}
    print(f"==> {DEPLOY_DAG_ID} {conf} (task logs: {log_path})", flush=True)
    report = run_dag(DEPLOY_DAG_ID, dt.datetime.now(dt.UTC).date().isoformat(), conf=conf, log_path=log_path)
    for task_id, state in task_states(DEPLOY_DAG_ID, report.run_id).items():
        print(f"  {task_id:26s} {state}")
    for row in Records(bootstrap.configured_settings(dict(os.environ))).of_run("deployments_of_run", report.run_id):
        print(f"  {row['action']:8s} {row['target']:5s} {row['model_name']} v{row['model_version']}  {row['status']}")
        print(f"           {row['image_uri'] or row['endpoint'] or ''}  {row['detail'][:160]}")
    if not report.succeeded:
        print(f"\n{DEPLOY_DAG_ID} failed; see {log_path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
