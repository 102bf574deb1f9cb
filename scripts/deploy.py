"""``make deploy`` / ``make rollback``: run the ``network_security_deploy`` DAG on the embedded stack.

Usage: ``python -m scripts.deploy redeploy`` or ``python -m scripts.deploy rollback --reason "..."``.
The same deploy task group the training DAG runs after a promotion does the work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from scripts import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["redeploy", "rollback"])
    parser.add_argument("--reason", default="", help="why (required for a rollback; kept on the demoted version)")
    args = parser.parse_args(argv)
    if args.action == "rollback" and not args.reason.strip():
        parser.error('a rollback needs a reason: make rollback REASON="..."')

    paths = stack.Paths.from_env()
    try:
        os.environ.update(stack.up(paths))
    except stack.StackError as err:
        print(f"stack: {err}", file=sys.stderr)
        return 2
    from scripts.dag_runner import run_dag
    from tasks.config import DEPLOY_DAG_ID

    log_path = paths.logs / f"{DEPLOY_DAG_ID}.log"
    conf = {"action": args.action, "reason": args.reason or None}
    print(f"==> {DEPLOY_DAG_ID} {conf} (task logs: {log_path})", flush=True)
    report = run_dag(DEPLOY_DAG_ID, dt.datetime.now(dt.UTC).date().isoformat(), conf=conf, log_path=log_path)
    for task_id, state in report.task_states.items():
        print(f"  {task_id:26s} {state}")
    chosen = report.outputs.get("choose_release") or {}
    if chosen.get("rolled_back_version"):
        print(f"  rolled back    v{chosen['rolled_back_version']} -> v{chosen['champion_version']}")
    recorded = report.outputs.get("deploy.record_deployment")
    if recorded:
        print(f"  deployed       {recorded['model_name']} v{recorded['model_version']} to {recorded['targets']}")
        print(f"  image          {recorded['image_uri']}")
        if recorded.get("endpoint"):
            print(f"  serving        {recorded['endpoint']}")
    if not report.succeeded:
        print(f"\n{DEPLOY_DAG_ID} failed; see {log_path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
