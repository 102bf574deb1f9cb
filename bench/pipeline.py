"""Pipeline benchmark: the whole training DAG through ``airflow dags test`` against its ``tasks/`` functions in one process.

A day of ``--rows`` generated rows (1M by default, 4 CSV files as ``make publish-drop ...
--rows N --parts 4`` writes them) is published to a private stack (moto, MLflow, an Airflow
metadata DB and ``airflow_settings.yaml`` applied, on free loopback ports, state in a
temporary folder). Then, each in a fresh process:

* **DAG**: ``network_security_training`` run to completion with ``dag.test()`` (what
  ``airflow dags test`` and ``make run`` do, via ``scripts/dag_runner.py``): plan, sensor,
  ingest, GX validation, transform, ``start_training``, the mapped ``train_candidate``
  tasks, ``train`` (refit + register), evaluate, gate, ``keep_champion``;
* **floor**: the same ``tasks/pipeline.py`` functions called in sequence in one process
  (``plan_run``, ``ingest``, the GX suite on the snapshot, ``transform``, ``train``,
  ``evaluate``, ``keep_champion``), no Airflow.

Both runs are given ``force_gate=reject`` (with its reason), so neither deploys: the
deploy group starts model servers and rolls out to the emulated EC2 fleet, which is not
the training pipeline's cost. Each run gets its own day (same rows and seed), so the DAG
never finds the floor's snapshot. Target: the DAG at most 1.3x the floor.

Usage::

    python -m bench.pipeline                  # 1M rows
    python -m bench.pipeline --rows 100000    # quicker
    python -m bench.pipeline --repeat 3       # three pairs, order alternating; the median ratio
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import load_average, table
from bench.train import PrivateStack, _exit_on_sigterm, run_plan

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIRST_DAY = "2026-04-01"
NO_DEPLOY = {"force_gate": "reject", "force_reason": "benchmark: measure the pipeline, not a deployment"}
TARGET_RATIO = 1.3


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _exit_on_sigterm()
    if args.worker == "dag":
        print("RESULT " + json.dumps(_dag(args.ds, args.log_dir)), flush=True)
        return 0
    if args.worker == "floor":
        print("RESULT " + json.dumps(_floor(os.environ, args.ds)), flush=True)
        return 0
    from tasks.datagen import publish_drop

    with PrivateStack(airflow=True) as env:
        from scripts.services import s3_client

        pairs: list[dict[str, dict[str, Any]]] = []
        for pair in range(args.repeat):
            # Alternate the order (floor first, then the DAG first, ...) so a load that rises or
            # falls during the bench does not favour one side; each run gets a day of its own.
            order = args.runs if pair % 2 == 0 else list(reversed(args.runs))
            results = {}
            for kind in order:
                ds = (dt.date.fromisoformat(FIRST_DAY) + dt.timedelta(days=len(pairs) * 2 + len(results))).isoformat()
                # The same rows on every day (one seed), so every run does the same work.
                publish_drop(s3_client(env), run_plan(env, ds).layout, args.rows, seed=args.seed, parts=4)
                print(f"pair {pair + 1}: {kind} on {args.rows:,} rows, {ds} (load {load_average()}) ...", flush=True)
                results[kind] = _measure(env, kind, ds, args.log_dir)
            pairs.append(results)
        if set(args.runs) == {"floor", "dag"}:
            _report(args.rows, pairs)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--runs", nargs="+", choices=["floor", "dag"], default=["floor", "dag"], help="default both")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (floor and DAG), order alternating")
    parser.add_argument("--log-dir", type=Path, help="keep the DAG runs' task logs here (default: discarded)")
    parser.add_argument("--worker", choices=["dag", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--ds", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _measure(env: dict[str, str], kind: str, ds: str, log_dir: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    keep = ["--log-dir", str(log_dir.resolve())] if log_dir else []
    done = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--worker", kind, "--ds", ds, *keep],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench.pipeline {kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result.update(seconds=seconds, load=load_average())
    print(f"  {seconds:.1f} s: {result['summary']}", flush=True)
    return result


def _dag(ds: str, log_dir: Path | None) -> dict[str, Any]:
    from scripts.dag_runner import run_dag, task_states
    from scripts.services import airflow_json
    from tasks.config import TRAINING_DAG_ID

    log = (log_dir or Path(os.environ["NS_STATE_DIR"]) / "logs") / f"bench-dag-{ds}.log"
    started, started_at = time.perf_counter(), time.time()
    report = run_dag(TRAINING_DAG_ID, ds, conf=NO_DEPLOY, log_path=log)
    run_seconds = time.perf_counter() - started
    states = task_states(TRAINING_DAG_ID, report.run_id)
    if not report.succeeded:
        raise SystemExit(f"the DAG run {report.run_id} ended {report.state}: {states}; log {log}")
    ran = sorted(task for task, state in states.items() if state == "success")
    summary = f"{report.run_id} {report.state} in {run_seconds:.1f} s, {len(ran)} tasks succeeded"
    timeline = _timeline(airflow_json("tasks", "states-for-dag-run", TRAINING_DAG_ID, report.run_id), started_at)
    return {"summary": summary, "tasks": ran, "run_seconds": run_seconds, "timeline": timeline}


def _timeline(rows: list[dict[str, Any]], started_at: float) -> dict[str, Any]:
    """Where the DAG run's time went, from its task instances' start and end times: each task's
    seconds (a mapped task's instances summed), the time before the first task started, and the
    time no task was running (between tasks and after the last)."""
    spans = [
        (dt.datetime.fromisoformat(row["start_date"]).timestamp(), dt.datetime.fromisoformat(row["end_date"]).timestamp(), row["task_id"])
        for row in rows
        if row.get("start_date") and row.get("end_date")
    ]  # fmt: skip
    tasks: dict[str, float] = {}
    for start, end, task_id in spans:
        tasks[task_id] = tasks.get(task_id, 0.0) + end - start
    busy, covered_to = 0.0, None
    for start, end, _ in sorted(spans):
        if covered_to is None or start > covered_to:
            busy += end - start
            covered_to = end
        elif end > covered_to:
            busy += end - covered_to
            covered_to = end
    first = min((start for start, _, _ in spans), default=started_at)
    return {"tasks": tasks, "before_first_task": first - started_at, "busy": busy}


def _floor(env: Any, ds: str) -> dict[str, Any]:
    import great_expectations as gx

    from scripts.services import s3_client
    from tasks import pipeline
    from tasks.plan import plan_run
    from tasks.validate import describe_failures, expectation_suite, snapshot_batch_definition, write_validation_result

    steps: dict[str, float] = {}

    def step(name: str, started: float) -> float:
        now = time.perf_counter()
        steps[name] = now - started
        return now

    t = first = time.perf_counter()
    from scripts.bootstrap import configured_settings
    from tasks.dataset_spec import available_datasets

    plan = plan_run(configured_settings(env), NO_DEPLOY, ds, "manual", available_datasets())
    s3 = s3_client(env)
    t = step("plan", t)
    pipeline.ingest(plan, s3)
    t = step("ingest", t)
    context = gx.get_context(mode="ephemeral")
    options = {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"]}
    options |= {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
    batch = snapshot_batch_definition(context, plan.layout.snapshot, options).get_batch()
    result = batch.validate(expectation_suite(plan.spec), result_format="SUMMARY").describe_dict()
    if not result["success"]:
        raise SystemExit(f"validation failed: {describe_failures(result)}")
    validation_uri = write_validation_result(s3, plan.layout, result)
    t = step("validate", t)
    features = pipeline.transform(plan, s3)
    t = step("transform", t)
    training = pipeline.train(plan, s3, features, validation_uri, "bench_pipeline_floor", f"floor__{ds}")
    t = step("train", t)
    evaluation = pipeline.evaluate(plan, s3, features, training, validation_uri)
    t = step("evaluate", t)
    pipeline.keep_champion(plan, _store(env), evaluation, f"floor__{ds}")
    run_seconds = step("keep_champion", t) - first
    summary = f"in {run_seconds:.1f} s: " + ", ".join(f"{k} {v:.1f}s" for k, v in steps.items())
    return {"summary": summary, "steps": steps, "run_seconds": run_seconds}


class _Rows:
    """A monitoring store keeping rows in memory: the floor's one promotion-log row (a
    negligible write) without the SQL hook, which is Airflow's."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def insert_rows(self, table: str, rows: Any, target_fields: Any = None, **_: Any) -> None:
        self.rows.extend(rows)

    def query(self, sql: str, parameters: Any) -> list[dict[str, Any]]:
        return []


def _store(env: Any) -> Any:
    return _Rows()


def _report(rows: int, pairs: list[dict[str, dict[str, Any]]]) -> None:
    body = []
    for number, pair in enumerate(pairs, 1):
        dag, floor = pair["dag"], pair["floor"]
        body += [
            [number, "DAG (dag.test, as `airflow dags test`)", dag["run_seconds"], dag["run_seconds"] / floor["run_seconds"], dag["seconds"], dag["seconds"] / floor["seconds"], dag["load"]],
            [number, "floor (tasks/ functions, one process)", floor["run_seconds"], 1.0, floor["seconds"], 1.0, floor["load"]],
        ]  # fmt: skip
    print()
    print(f"{rows:,} rows")
    print(table(["pair", "run", "run s", "x floor", "process s", "x floor (process)", "load after"], body))
    print()
    print("run s: the DAG run (dag.test) / the functions in sequence; process s: the whole process (imports, CLI)")
    for number, pair in enumerate(pairs, 1):
        dag, floor = pair["dag"], pair["floor"]
        timeline = dag["timeline"]
        idle = dag["run_seconds"] - timeline["busy"]
        print(f"pair {number} floor steps: {floor['summary']}")
        print(
            f"pair {number} DAG run: {timeline['before_first_task']:.1f} s before the first task,"
            f" {timeline['busy']:.1f} s with a task running, {idle:.1f} s with none (start-up, scheduling, between tasks)"
        )
        ran = {task: seconds for task, seconds in timeline["tasks"].items() if task in dag["tasks"]}
        print(f"pair {number} DAG tasks: " + ", ".join(f"{task} {seconds:.1f}s" for task, seconds in ran.items()))
    ratios = sorted(pair["dag"]["run_seconds"] / pair["floor"]["run_seconds"] for pair in pairs)
    median = statistics.median(ratios)
    print(
        f"DAG / floor per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median {median:.2f} (target <= {TARGET_RATIO});"
        f" load average {load_average()} ({os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    sys.exit(main())
