"""Load test of the model server: no 5xx, and every prediction served is in the prediction log.

It starts ``python -m serving`` on loopback (the registry's ``<name>@<alias>``, default
``network_security@champion``, pinned to the version it resolves to) with its prediction
log writing to a fresh prefix of the lake bucket (``loadtest/<run>/``, never the
``predictions/`` prefix the drift DAG reads), then for ``--seconds`` (default 60) sends
``--concurrency`` concurrent streams of requests, each one after the other, mixing
``POST /predict`` with ``POST /predict/batch`` (a ``--batch-share`` of the requests, 2 to
``--max-batch-records`` records each), optionally paced to ``--rate`` requests per second.
Every request carries its own ``X-Request-ID``, so each record sent has a known
prediction-log id (``<id>`` for a single record, ``<id>:<i>`` for the i-th of a batch).

When the time is up no new request is sent; requests in flight finish (each times out
after ``--request-timeout`` seconds, and the whole run is cut off shortly after that).
The server is then stopped with SIGTERM, as a deploy would: its shutdown writes what the
prediction log still buffers. Only then are the log's objects read back from S3 and
their rows counted.

It fails (exit code 1) unless:

* no answer is a 5xx, every request got an answer, and every answer is a 200 holding one
  prediction per record sent, with the request's id;
* the ``/metrics`` counters agree: ``prediction_log_enqueued_total`` equals the records
  answered, nothing was dropped;
* the server shut down cleanly (SIGTERM, no error in its log);
* the rows in the flushed S3 objects are exactly the records answered: as many rows as
  records, each request id once, none missing, none unexpected, all from the served version.

Usage (a champion registered, e.g. by ``make run``; ``source .state/env.sh`` first)::

    python -m bench.load_test               # 60 s
    python -m bench.load_test --seconds 5   # quick look

The log objects are deleted afterwards unless ``--keep-log``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import itertools
import json
import math
import os
import random
import re
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.common import (
    LOOPBACK,
    ServerError,
    ServerProcess,
    base_environment,
    client_session,
    free_port,
    load_average,
    metric_values,
    percentile,
    resolve_alias,
    run_async,
    sample_records,
    serving_command,
    table,
)
from tasks.dataset_spec import load_spec

PREDICT = "/predict"
PREDICT_BATCH = "/predict/batch"
# Lines of the server's log that mean something went wrong (uvicorn and the app log errors as "ERROR").
_LOG_ERROR = re.compile(r"\bERROR\b|Traceback|are lost")


@dataclass
class Sent:
    """One request of the load and what came back.

    Attributes:
        endpoint: ``/predict`` or ``/predict/batch``.
        request_id: The ``X-Request-ID`` it carried.
        records: Records it held.
        status: HTTP status of the answer, None when there was none (refused, reset, timed out).
        seconds: From sending to the end of the answer.
        problem: What was wrong with a 200 answer (wrong id or count), else empty.
    """

    endpoint: str
    request_id: str
    records: int
    status: int | None
    seconds: float
    problem: str = ""

    @property
    def log_ids(self) -> list[str]:
        """The prediction-log ids of its records."""
        if self.endpoint == PREDICT:
            return [self.request_id]
        return [f"{self.request_id}:{i}" for i in range(self.records)]


@dataclass
class Check:
    name: str
    expected: str
    observed: str
    ok: bool


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from serving.prediction_log import default_s3_client
    from tasks import storage
    from tasks.config import Settings

    spec = load_spec(args.dataset)
    version = resolve_alias(args.tracking_uri, args.model_name, args.alias, "load test")
    bucket = args.prediction_log_bucket or Settings.load().lake_bucket
    run = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    prefix = f"{args.prediction_log_prefix.strip('/')}/{run}"
    s3 = default_s3_client()
    try:
        with storage.reachable(s3):
            s3.head_bucket(Bucket=bucket)
    except Exception as err:
        sys.exit(
            f"load test: bucket {bucket!r} is not reachable at {storage.endpoint_of(s3)} ({err}); "
            "source the stack's env.sh (AWS_ENDPOINT_URL, credentials) first"
        )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="load-test-"))
    pool = sample_records(spec, args.distinct_records, seed=args.seed)
    print(f"model          {args.model_name}@{args.alias} = version {version} on {args.tracking_uri}")
    print(f"prediction log s3://{bucket}/{prefix}/")
    print(
        f"load           {args.seconds:g} s, {args.concurrency} concurrent streams, "
        f"{args.batch_share:.0%} batches of 2-{args.max_batch_records} records, "
        + (f"paced to {args.rate:g} requests/s" if args.rate else "unpaced (each stream sends when answered)")
    )
    print(f"machine        {os.cpu_count()} CPUs, load average {load_average()} at the start")
    print(f"server log     {workdir / 'serving.log'}", flush=True)

    port, api_key = free_port(), secrets.token_urlsafe(24)
    env = base_environment()
    env.update(
        {
            "MLFLOW_TRACKING_URI": args.tracking_uri,
            "MODEL_NAME": args.model_name,
            "MODEL_VERSION": version,
            "DATASET": args.dataset,
            "API_KEY": api_key,
            "PREDICTION_LOG_BUCKET": bucket,
            "PREDICTION_LOG_PREFIX": prefix,
            "ALIAS_POLL_SECONDS": "0",
            "MAX_BATCH_SIZE": str(max(1000, args.max_batch_records)),
        }
    )
    env.pop("API_KEY_FILE", None)
    env.update(dict(item.split("=", 1) for item in args.server_env))
    base = f"http://{LOOPBACK}:{port}"
    server = ServerProcess("serving (this app)", serving_command(port), env, f"{base}/ready", workdir / "serving.log")
    headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
    checks: list[Check] = []
    try:
        server.start()
        served = httpx.get(f"{base}/model", headers=headers, trust_env=False, timeout=10).json()["model_version"]
        if served != version:
            sys.exit(f"load test: the server loaded version {served}, expected {version}")
        bodies = [json.dumps(record, separators=(",", ":")).encode() for record in pool]
        started = time.perf_counter()
        sent, finished_in_time = run_async(lambda: _load(base, headers, bodies, run, args))
        elapsed = time.perf_counter() - started
        # Before the shutdown: what the counters say with the load just stopped.
        metrics = metric_values(base)
        print(f"load done in {elapsed:.1f} s; stopping the server (SIGTERM) ...", flush=True)
        exit_code = server.stop(timeout=args.shutdown_timeout)
        print(f"reading the prediction log back from s3://{bucket}/{prefix}/ ...", flush=True)
        objects, logged_ids, versions = _read_log(s3, bucket, prefix)
        checks = _checks(sent, finished_in_time, metrics, exit_code, server, objects, logged_ids, versions, version)
        print(f"\nLoad ({elapsed:.1f} s; load average {load_average()} at the end):\n")
        print(_summary(sent, elapsed))
        rows = sum(logged_ids.values())
        print(f"\nPrediction log: {rows:,} rows in {objects:,} object(s) under s3://{bucket}/{prefix}/\n")
        print(table(["check", "expected", "observed", "result"], [_check_cells(c) for c in checks]))
    except ServerError as err:
        sys.exit(f"load test: {err}")
    finally:
        server.stop(timeout=5.0)
        if not args.keep_log:
            try:
                storage.delete_prefix(s3, bucket, prefix)
            except Exception as err:  # cleaning up must not hide the verdict
                print(f"load test: could not delete s3://{bucket}/{prefix}/: {err}", file=sys.stderr)
    failed = [c for c in checks if not c.ok]
    print(f"\n{'FAILED' if failed else 'PASSED'}: {len(checks) - len(failed)}/{len(checks)} checks passed")
    return 1 if failed or not checks else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_test",
        description="Bounded load test of the model server: zero 5xx and no lost prediction-log records.",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send requests (default 60)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent request streams (default 8)")
    parser.add_argument(
        "--batch-share", type=float, default=0.1, help="share of requests sent to /predict/batch (default 0.1)"
    )
    parser.add_argument(
        "--max-batch-records", type=int, default=50, help="most records of a batch request (default 50)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests per second in all, 0 = as fast as answered (default 0)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds before a request counts as unanswered (default 30)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds the server gets to shut down and flush its log before SIGKILL (default 60)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5050",
        help="MLflow tracking server holding the registry (default $MLFLOW_TRACKING_URI, else http://127.0.0.1:5050)",
    )
    parser.add_argument("--model-name", default="network_security", help="registered model (default network_security)")
    parser.add_argument("--alias", default="champion", help="alias of the version served (default champion)")
    parser.add_argument("--dataset", default="network_security", help="dataset spec (default network_security)")
    parser.add_argument(
        "--prediction-log-bucket", default="", help="default the lake bucket (NS_LAKE_BUCKET or network-security-lake)"
    )
    parser.add_argument(
        "--prediction-log-prefix", default="loadtest", help="parent of this run's log prefix (default loadtest)"
    )
    parser.add_argument("--keep-log", action="store_true", help="keep the prediction-log objects of the run")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the server, e.g. PREDICTION_LOG_MAX_BUFFER=100 to see the test fail (repeatable)",
    )
    parser.add_argument(
        "--distinct-records", type=int, default=5000, help="generated records drawn from (default 5000)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the records and of the request mix (default 7)")
    parser.add_argument("--workdir", help="folder for the server's log (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.request_timeout <= 0 or args.distinct_records < 1:
        parser.error("--seconds, --concurrency, --request-timeout and --distinct-records must be positive")
    if not 0 <= args.batch_share <= 1 or args.max_batch_records < 2 or args.rate < 0:
        parser.error("--batch-share is between 0 and 1, --max-batch-records at least 2, --rate not negative")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    return args


async def _load(
    base: str, headers: dict[str, str], bodies: list[bytes], run: str, args: argparse.Namespace
) -> tuple[list[Sent], bool]:
    """Send the mixed load until ``args.seconds`` have passed; returns the requests and whether it stopped in time."""
    sent: list[Sent] = []
    numbers = itertools.count()
    started = time.perf_counter()
    stop_sending = started + args.seconds

    async def request(session: aiohttp.ClientSession, rng: random.Random, number: int) -> Sent:
        request_id = f"lt-{run}-{number}"
        if rng.random() < args.batch_share:
            chosen = [bodies[rng.randrange(len(bodies))] for _ in range(rng.randint(2, args.max_batch_records))]
            endpoint, body = PREDICT_BATCH, b'{"records":[' + b",".join(chosen) + b"]}"
        else:
            chosen = [bodies[rng.randrange(len(bodies))]]
            endpoint, body = PREDICT, chosen[0]
        outcome = Sent(endpoint, request_id, len(chosen), None, math.nan)
        began = time.perf_counter()
        try:
            async with session.post(base + endpoint, data=body, headers={**headers, "X-Request-ID": request_id}) as r:
                payload = await r.read()
                outcome.status = r.status
        except (aiohttp.ClientError, TimeoutError) as err:
            outcome.problem = f"no answer: {type(err).__name__}"
            return outcome
        finally:
            outcome.seconds = time.perf_counter() - began
        if outcome.status == 200:
            outcome.problem = _answer_problem(endpoint, payload, request_id, len(chosen))
        return outcome

    async def stream(index: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(args.seed * 1_000_003 + index)
        while time.perf_counter() < stop_sending:
            number = next(numbers)
            if args.rate:
                due = started + number / args.rate
                if due >= stop_sending:
                    return
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent.append(await request(session, rng, number))

    async with client_session(args.concurrency, timeout=args.request_timeout) as session:
        streams = asyncio.gather(*(stream(i, session) for i in range(args.concurrency)))
        try:
            # Each request ends within its timeout, so this bound is only hit if something hangs.
            await asyncio.wait_for(streams, timeout=args.seconds + args.request_timeout + 10)
        except TimeoutError:
            return sent, False
    return sent, True


def _answer_problem(endpoint: str, payload: bytes, request_id: str, records: int) -> str:
    """What is wrong with a 200 answer, or an empty string."""
    try:
        body = json.loads(payload)
    except ValueError:
        return "answer is not JSON"
    if body.get("request_id") != request_id:
        return f"answer carries request id {body.get('request_id')!r}"
    if endpoint == PREDICT:
        return "" if "label" in body and "probability" in body else "answer has no label or probability"
    predictions = body.get("predictions") or []
    if len(predictions) != records:
        return f"{len(predictions)} predictions for {records} records"
    if any(p.get("request_id") != f"{request_id}:{i}" for i, p in enumerate(predictions)):
        return "a prediction carries the wrong request id"
    return ""


def _read_log(s3: Any, bucket: str, prefix: str) -> tuple[int, Counter[str], Counter[str]]:
    """Objects under ``prefix``, and the request ids and model versions of their rows (counted)."""
    from tasks import storage

    keys = storage.list_keys(s3, bucket, prefix + "/")

    def rows(key: str) -> list[dict[str, Any]]:
        body = storage.get_bytes(s3, storage.S3Location(bucket, key))
        if key.endswith(".parquet"):  # the drift DAG reads both formats; the server writes JSON lines today
            import pyarrow.parquet as pq

            return pq.read_table(io.BytesIO(body), columns=["request_id", "model_version"]).to_pylist()
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    ids: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for records in pool.map(rows, keys):
            ids.update(str(r.get("request_id")) for r in records)
            versions.update(str(r.get("model_version")) for r in records)
    return len(keys), ids, versions


def _checks(
    sent: list[Sent],
    finished_in_time: bool,
    metrics: dict[str, float],
    exit_code: int | None,
    server: ServerProcess,
    objects: int,
    logged: Counter[str],
    versions: Counter[str],
    version: str,
) -> list[Check]:
    answered = [s for s in sent if s.status == 200]
    server_errors = sum(1 for s in sent if s.status is not None and s.status >= 500)
    other = sum(1 for s in sent if s.status is not None and s.status != 200 and s.status < 500)
    unanswered = sum(1 for s in sent if s.status is None)
    wrong = [s for s in answered if s.problem]
    expected_ids = [log_id for s in answered for log_id in s.log_ids]
    records_sent = sum(s.records for s in sent)
    records_answered = len(expected_ids)
    expected = set(expected_ids)
    missing = len(expected - logged.keys())
    unexpected = sum(count for log_id, count in logged.items() if log_id not in expected)
    duplicated = sum(count - 1 for count in logged.values() if count > 1)
    logged_rows = sum(logged.values())
    enqueued = metrics.get("prediction_log_enqueued_total", math.nan)
    dropped = metrics.get("prediction_log_dropped_total", math.nan)
    problems = [line.strip() for line in _server_log(server).splitlines() if _LOG_ERROR.search(line)]
    clean_exit = exit_code in (0, -signal.SIGTERM)
    other_versions = sum(count for v, count in versions.items() if v != version)
    return [
        Check("requests sent", "> 0", f"{len(sent):,} ({records_sent:,} records)", bool(sent)),
        Check("5xx answers", "0", f"{server_errors:,}", server_errors == 0),
        Check("requests without an answer", "0", f"{unanswered:,}", unanswered == 0),
        Check("other non-200 answers", "0", f"{other:,}", other == 0),
        Check(
            "200 answers as sent (request id, one prediction per record)",
            f"{len(answered):,}",
            f"{len(answered) - len(wrong):,}" + (f" (e.g. {wrong[0].problem})" if wrong else ""),
            not wrong,
        ),
        Check("load stopped on time", "yes", "yes" if finished_in_time else "no (cut off)", finished_in_time),
        Check(
            "/metrics prediction_log_enqueued_total",
            f"{records_answered:,} (records answered)",
            f"{enqueued:,.0f} (buffered at stop: {metrics.get('prediction_log_buffered_records', math.nan):,.0f})",
            enqueued == records_answered,
        ),
        Check("/metrics prediction_log_dropped_total", "0", f"{dropped:,.0f}", dropped == 0),
        Check(
            "server shut down cleanly, log free of errors",
            "SIGTERM exit, 0 error lines",
            f"exit {exit_code}, {len(problems)} error lines" + (f" (e.g. {problems[0][:80]})" if problems else ""),
            clean_exit and not problems,
        ),
        Check(
            "rows in the flushed S3 objects",
            f"{records_answered:,} (records answered)",
            f"{logged_rows:,} in {objects:,} object(s)",
            logged_rows == records_answered,
        ),
        Check(
            "request ids logged: missing / unexpected / duplicated",
            "0 / 0 / 0",
            f"{missing:,} / {unexpected:,} / {duplicated:,}",
            missing == unexpected == duplicated == 0,
        ),
        Check(f"rows logged with a version other than v{version}", "0", f"{other_versions:,}", other_versions == 0),
    ]


def _server_log(server: ServerProcess) -> str:
    try:
        return server.log_path.read_text(errors="replace")
    except OSError:
        return ""


def _summary(sent: list[Sent], elapsed: float) -> str:
    rows = []
    for name, group in ((PREDICT, [s for s in sent if s.endpoint == PREDICT]),
                        (PREDICT_BATCH, [s for s in sent if s.endpoint == PREDICT_BATCH]),
                        ("all", sent)):  # fmt: skip
        latencies = [s.seconds for s in group if s.status is not None]
        statuses = Counter(s.status for s in group)
        rows.append(
            [
                name,
                len(group),
                sum(s.records for s in group),
                len(group) / elapsed if elapsed > 0 else math.nan,
                1000 * percentile(latencies, 50),
                1000 * percentile(latencies, 95),
                1000 * percentile(latencies, 99),
                1000 * percentile(latencies, 100),
                statuses.get(200, 0),
                sum(n for status, n in statuses.items() if status is not None and 400 <= status < 500),
                sum(n for status, n in statuses.items() if status is not None and status >= 500),
                statuses.get(None, 0),
            ]
        )
    headers = ["endpoint", "requests", "records", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "200", "4xx"]
    return table([*headers, "5xx", "no answer"], rows)


def _check_cells(check: Check) -> list[str]:
    return [check.name, check.expected, check.observed, "PASS" if check.ok else "FAIL"]


if __name__ == "__main__":
    sys.exit(main())
