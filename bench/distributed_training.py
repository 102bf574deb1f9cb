"""Distributed training benchmark: the mapped candidate stage on two Celery workers against the same candidates in sequence.

On the distributed mode (``scripts/distributed``: CeleryExecutor on Postgres + Redis, two
workers of ``NS_DIST_WORKER_CONCURRENCY`` slots, on this machine's loopback and its ports from
the ``NS_DIST_*`` variables), a day of ``--rows`` generated rows (1M by default, 4 CSV files as
``make publish-drop ... --rows N --parts 4`` writes them) is published, then:

* **mapped**: a ``network_security_training`` run triggered through the REST API
  (``force_gate=reject``: nothing deploys). The candidate stage's wall time is read from the
  API's mapped task instances of ``train_candidate`` (``.../taskInstances/train_candidate/listMapped``):
  the last instance's ``end_date`` minus the first one's ``start_date``; each instance's own
  ``duration`` and the worker it ran on are listed too.
* **sequential, one process** (the baseline): the same ``tasks/pipeline.py`` function each mapped
  task calls, ``train_candidate``, called for every candidate one after another in one fresh
  process with the workers' environment, on the same features (the run's ``transform`` output,
  read from its XCom) under a parent MLflow run of its own. What the DAG ran before the
  candidates were mapped: one task scoring them in sequence. Each call reads the train split
  and the preprocessor from S3 as each mapped task does, but no task process is started,
  no DAG parsed and no XCom pushed: the baseline is the cheaper side (its stage has no
  Airflow overhead), which makes the ratio conservative.
* **sequential, one pool slot** (``--pool-baseline``): a second DAG run on another day with
  the same rows after the dataset's training pool is set to one slot through the REST API (and
  restored after): the same tasks, one at a time, Airflow's overhead on both sides.

While it runs, a thread samples the machine's CPU every second: the table gives the cores'
busy share during each stage and the 1-minute load average, since this machine has 2 cores
for everything (both workers, the scheduler, MLflow, moto, other sessions). Target (issue 14):
mapped stage <= 0.6x the sequential time.

The stack is started if it is not running (``up``; ``--fresh`` drops and recreates its
databases first) and stopped with its databases dropped at the end unless ``--keep``.

Usage::

    python -m bench.distributed_training                      # 1M rows, in-process baseline
    python -m bench.distributed_training --rows 100000 --keep
    python -m bench.distributed_training --pool-baseline      # also the one-slot DAG run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.common import load_average, table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAY_MAPPED, DAY_POOL = "2026-05-01", "2026-05-02"
NO_DEPLOY = {"force_gate": "reject", "force_reason": "benchmark: measure the candidate stage, not a deployment"}
TARGET_RATIO = 0.6
RUN_TIMEOUT = 3600.0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from bench.train import _exit_on_sigterm

    _exit_on_sigterm()
    if args.worker:
        print("RESULT " + json.dumps(_sequential(args.ds, json.loads(args.features), args.validation_uri)), flush=True)
        return 0
    from scripts import distributed

    config = distributed.Config.from_env()
    sampler = CpuSampler()
    sampler.start()
    try:
        env = distributed.up(config, fresh=args.fresh or not distributed.running(config))
        api = distributed.api(config)
        results = measure(config, env, api, args, sampler)
    finally:
        sampler.stop()
        if not args.keep:
            distributed.down(config, drop=True)
    _report(args.rows, config, results)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--pool-baseline", action="store_true", help="also a DAG run with the pool at one slot")
    parser.add_argument("--fresh", action="store_true", help="drop and recreate the stack's databases first")
    parser.add_argument(
        "--keep", action="store_true", help="leave the stack running (default: down, databases dropped)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ds", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--validation-uri", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class CpuSampler(threading.Thread):
    """The machine's CPU times every second, to tell how busy the cores were in a window."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[
            tuple[float, float, float]
        ] = []  # (wall time, busy seconds, total seconds) summed over cores
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            times = psutil.cpu_times()
            total = sum(times)
            idle = times.idle + getattr(times, "iowait", 0.0)
            self.samples.append((time.time(), total - idle, total))
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()

    def busy_share(self, start: float, end: float) -> float:
        """Busy share of all cores between ``start`` and ``end`` (epoch seconds), from the nearest samples."""
        inside = [s for s in self.samples if start - 1.0 <= s[0] <= end + 1.0]
        if len(inside) < 2:
            return float("nan")
        first, last = inside[0], inside[-1]
        return (last[1] - first[1]) / max(last[2] - first[2], 1e-9)


def measure(config: Any, env: dict[str, str], api: Any, args: argparse.Namespace, sampler: CpuSampler) -> list[dict]:
    from scripts.services import s3_client
    from tasks.config import TRAINING_DAG_ID, training_pool

    s3 = s3_client(env)
    results = []
    print(f"mapped: DAG run on {args.rows:,} rows (load {load_average()}) ...", flush=True)
    mapped = _dag_run(api, env, s3, TRAINING_DAG_ID, DAY_MAPPED, args.rows, args.seed, "mapped")
    mapped["busy"] = sampler.busy_share(mapped["start"], mapped["end"])
    results.append(mapped)

    features = api.xcom(TRAINING_DAG_ID, mapped["run_id"], "transform")
    validation_uri = api.xcom(TRAINING_DAG_ID, mapped["run_id"], "validate")
    print(f"sequential in one process on the same features (load {load_average()}) ...", flush=True)
    command = [
        sys.executable,
        "-m",
        "bench.distributed_training",
        "--worker",
        "--ds",
        DAY_MAPPED,
        "--features",
        json.dumps(features),
        "--validation-uri",
        validation_uri,
    ]
    from scripts.distributed.config import base_environ

    done = subprocess.run(command, env={**base_environ(), **env}, cwd=PROJECT_ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench.distributed_training: the sequential baseline failed:\n{done.stderr[-3000:]}")
    sequential = json.loads(lines[-1].removeprefix("RESULT "))
    sequential["busy"] = sampler.busy_share(sequential["start"], sequential["end"])
    sequential["load"] = load_average()
    results.append(sequential)
    _print_result(sequential)

    if args.pool_baseline:
        pool = training_pool("network_security")
        before = api.request("GET", f"/pools/{quote(pool, safe='')}")
        _set_slots(api, before, 1)
        try:
            print(f"sequential: DAG run with {pool} at 1 slot (load {load_average()}) ...", flush=True)
            one_slot = _dag_run(api, env, s3, TRAINING_DAG_ID, DAY_POOL, args.rows, args.seed, "one pool slot")
        finally:
            _set_slots(api, before, before["slots"])
        one_slot["busy"] = sampler.busy_share(one_slot["start"], one_slot["end"])
        results.append(one_slot)
    return results


def _set_slots(api: Any, pool: dict[str, Any], slots: int) -> None:
    body = {"pool": pool["name"], "slots": slots, "include_deferred": pool["include_deferred"]}
    api.request("PATCH", f"/pools/{quote(pool['name'], safe='')}", json=body, params={"update_mask": ["slots"]})


def _dag_run(api: Any, env: dict[str, str], s3: Any, dag_id: str, ds: str, rows: int, seed: int, kind: str) -> dict:
    """Publish ``ds``, trigger a run of it, wait; the mapped candidate instances' times from the API."""
    from bench.train import run_plan
    from tasks.datagen import publish_drop

    publish_drop(s3, run_plan(env, ds).layout, rows, seed=seed, parts=4)
    run_id = api.trigger(
        dag_id,
        conf={"ds": ds, **NO_DEPLOY},
        run_id=f"bench_{kind.replace(' ', '_')}_{rows}__{ds}__{int(time.time())}",
    )
    started = time.monotonic()
    run = api.wait_for_run(dag_id, run_id, RUN_TIMEOUT, poll=5.0)
    if run["state"] != "success":
        states = {task_id: ti["state"] for task_id, ti in api.task_instances(dag_id, run_id).items()}
        raise SystemExit(f"bench.distributed_training: {dag_id} run {run_id} ended {run['state']}: {states}")
    found = api.request(
        "GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/train_candidate/listMapped"
    )["task_instances"]
    instances = [
        {
            "candidate": ti.get("rendered_map_index") or str(ti["map_index"]),
            "start": _epoch(ti["start_date"]),
            "end": _epoch(ti["end_date"]),
            "seconds": float(ti["duration"]),
            "where": ti.get("hostname") or "?",
            # The CV itself (tasks.train.cross_validate_candidate), from the task's XCom.
            "cv_seconds": float(api.xcom(dag_id, run_id, "train_candidate", map_index=ti["map_index"])["seconds"]),
        }
        for ti in found
    ]
    others = api.task_instances(dag_id, run_id)
    result = {
        "kind": kind,
        "run_id": run_id,
        "candidates": sorted(instances, key=lambda i: i["start"]),
        "start": min(i["start"] for i in instances),
        "end": max(i["end"] for i in instances),
        "run_seconds": time.monotonic() - started,
        "refit_seconds": float(others["train"]["duration"]),
        "load": load_average(),
    }
    result["stage_seconds"] = result["end"] - result["start"]
    _print_result(result)
    return result


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _sequential(ds: str, features: dict[str, Any], validation_uri: str) -> dict[str, Any]:
    """The candidates one after another in this process: ``tasks.pipeline.train_candidate`` as each mapped task calls it."""
    from mlflow import MlflowClient

    from bench.train import run_plan
    from scripts.services import s3_client
    from tasks import pipeline

    env = dict(os.environ)
    plan, s3 = run_plan(env, ds), s3_client(env)
    assignments = pipeline.start_training(
        plan, s3, features, validation_uri, "bench_distributed_training", f"sequential__{ds}"
    )
    candidates = []
    for assignment in assignments:
        start, cpu = time.time(), time.process_time()
        scored = pipeline.train_candidate(plan, s3, features, assignment)
        end = time.time()
        candidates.append(
            {
                "candidate": assignment["candidate"],
                "start": start,
                "end": end,
                "seconds": end - start,
                "cv_seconds": float(scored["seconds"]),
                "cpu_seconds": time.process_time() - cpu,
                "where": "one process",
            }
        )
    # The parent run is not registered from: close it (the stage is what is measured).
    MlflowClient(plan.settings.mlflow_tracking_uri).set_terminated(assignments[0]["run_id"], "FINISHED")
    return {
        "kind": "sequential, one process",
        "candidates": candidates,
        "start": candidates[0]["start"],
        "end": candidates[-1]["end"],
        "stage_seconds": candidates[-1]["end"] - candidates[0]["start"],
    }


def _print_result(result: dict[str, Any]) -> None:
    each = ", ".join(
        f"{c['candidate']} {c['seconds']:.1f}s (CV {c['cv_seconds']:.1f}s, {c['where']})" for c in result["candidates"]
    )
    print(f"  {result['kind']}: candidate stage {result['stage_seconds']:.1f} s: {each}", flush=True)


def _report(rows: int, config: Any, results: list[dict]) -> None:
    mapped = results[0]
    baselines = results[1:]
    rows_out = []
    for result in results:
        per = {c["candidate"]: c["seconds"] for c in result["candidates"]}
        rows_out.append(
            [
                result["kind"],
                result["stage_seconds"],
                result["stage_seconds"] / baselines[0]["stage_seconds"],
                *(per.get(name, float("nan")) for name in _names(results)),
                sum(per.values()),
                f"{result['busy'] * 100:.0f}%",
                result["load"],
            ]
        )
    print()
    print(
        f"{rows:,} rows ({int(rows * 0.8):,} train rows), {config.workers} workers x {config.worker_concurrency} slots, "
        f"{os.cpu_count()} cores"
    )
    print(
        table(
            [
                "candidate stage",
                "wall s",
                "x sequential",
                *(f"{name} s" for name in _names(results)),
                "sum s",
                "cores busy",
                "load after",
            ],
            rows_out,
        )
    )
    print()
    detail = [
        [
            result["kind"],
            c["candidate"],
            c["where"],
            c["start"] - result["start"],
            c["seconds"],
            c["cv_seconds"],
            c["seconds"] - c["cv_seconds"],
            c.get("cpu_seconds", float("nan")),
        ]
        for result in results
        for c in result["candidates"]
    ]
    print(
        "per candidate (task s: the mapped instance's duration or the call's wall time; CV s: the cross-validation in it)"
    )
    print(table(["stage", "candidate", "ran on", "started at s", "task s", "CV s", "outside CV s", "CPU s"], detail))
    print()
    ratio = mapped["stage_seconds"] / baselines[0]["stage_seconds"]
    print(
        f"mapped candidate stage {mapped['stage_seconds']:.1f} s vs {baselines[0]['stage_seconds']:.1f} s "
        f"in sequence in one process: {ratio:.2f}x (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})"
    )
    sequential = baselines[0]["candidates"]
    cpu = sum(c["cpu_seconds"] for c in sequential)
    longest = max(sequential, key=lambda c: c["seconds"])
    print(
        f"bounds from the sequential run: its candidates used {cpu:.1f} CPU s in {baselines[0]['stage_seconds']:.1f} s "
        f"({cpu / baselines[0]['stage_seconds']:.2f} cores busy on average), so on {os.cpu_count()} cores no schedule "
        f"beats {cpu / (os.cpu_count() or 1):.1f} s ({cpu / (os.cpu_count() or 1) / baselines[0]['stage_seconds']:.2f}x); "
        f"one candidate per worker of its own cores would still wait for the longest, {longest['candidate']} {longest['seconds']:.1f} s "
        f"({longest['seconds'] / baselines[0]['stage_seconds']:.2f}x)"
    )
    for other in baselines[1:]:
        print(
            f"against {other['kind']} ({other['stage_seconds']:.1f} s): "
            f"{mapped['stage_seconds'] / other['stage_seconds']:.2f}x"
        )
    print(f"load average at the end: {load_average()} ({os.cpu_count()} cores)")


def _names(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(c["candidate"] for result in results for c in result["candidates"]))


if __name__ == "__main__":
    sys.exit(main())
