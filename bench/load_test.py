"""Load test of the model server: no 5xx, and every prediction answered 200 is in the log exactly once.

It starts ``python -m serving`` on loopback (the registry's ``<name>@<alias>``, default
``network_security@champion``, pinned to the version it resolves to) with its prediction
log writing to a fresh prefix of the lake bucket (``loadtest/<run>/``, never the
``predictions/`` prefix the drift DAG reads), then for ``--seconds`` (default 60) sends
``--concurrency`` concurrent streams of requests, each one after the other, mixing
``POST /predict`` with ``POST /predict/batch`` (a ``--batch-share`` of the requests, 2 to
``--max-batch-records`` records each, or exactly ``--batch-records``), optionally paced to
``--rate`` requests per second. Every request carries its own ``X-Request-ID``, so each
record sent has a known prediction-log id (``<id>`` for a single record, ``<id>:<i>`` for
the i-th of a batch). A 503 with ``Retry-After`` (the server's back-pressure) is waited
out as it asks, then the stream goes on with a new request.

Faults, in the middle of the load (``--fault-at`` seconds in, default: centred):

* ``--pause-s3 S``: the S3 emulator (the moto server behind ``AWS_ENDPOINT_URL``, on
  loopback) is paused with SIGSTOP for S seconds, then resumed with SIGCONT (a restart
  would lose moto's in-memory buckets);
* ``--kill-server``: the server is SIGKILLed and started again on the same port with the
  same durable spool (``--kill-server`` turns ``--spool`` on), which it replays at start.

When the time is up no new request is sent; requests in flight finish (each times out
after ``--request-timeout`` seconds). The server is then stopped with SIGTERM, as a deploy
would: its shutdown writes what the prediction log still holds. Only then are the log's
objects read back from S3 and their rows counted.

It fails (exit code 1) unless:

* no answer is a 5xx other than the back-pressure 503 with ``Retry-After``; every request
  got an answer (with ``--kill-server``: but those cut off by the kill and those sent
  while the server was down); no other non-200; every 200 holds one prediction per record
  with the request's id;
* the ``/metrics`` counters agree (``prediction_log_enqueued_total`` equals the records
  answered, except after a kill: another process), nothing was dropped;
* the server shut down cleanly (SIGTERM, no error in its log);
* the rows in S3 are exactly the records answered 200: each once, none missing, none
  unexpected (after a kill: but records of requests the kill cut off, which were spooled
  before their answer could be sent), all from the served version.

Usage (a champion registered, e.g. by ``make run``; ``source .state/env.sh`` first)::

    python -m bench.load_test                                   # 60 s, mixed load
    python -m bench.load_test --seconds 5                       # quick look
    # the hardening acceptance: back-to-back 10,000-record batches from 4 clients for 60 s
    python -m bench.load_test --concurrency 4 --batch-share 1 --batch-records 10000
    python -m bench.load_test --concurrency 4 --batch-share 1 --batch-records 10000 --pause-s3 30
    python -m bench.load_test --concurrency 4 --batch-share 1 --batch-records 10000 --kill-server

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import httpx
import msgspec

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
# The server's back-pressure answers (serving/edge.py): 503 with Retry-After, nothing scored.
_BACK_PRESSURE = ("not accepting predictions for now", "server busy")
# A (re)started server answers this, with Retry-After, until its model is loaded.
_NOT_READY = "no model loaded"


@dataclass
class Sent:
    """One request of the load and what came back.

    Attributes:
        endpoint: ``/predict`` or ``/predict/batch``.
        request_id: The ``X-Request-ID`` it carried.
        records: Records it held.
        status: HTTP status of the answer, None when there was none (refused, reset, timed out).
        seconds: From sending to the end of the answer.
        sent_at: When it was sent, in seconds since the load started.
        problem: What was wrong with a 200 answer (wrong id or count), or the detail of a 503.
        back_pressure: The answer was the server's 503 with ``Retry-After``.
        retry_after: Its ``Retry-After`` in seconds.
    """

    endpoint: str
    request_id: str
    records: int
    status: int | None
    seconds: float
    sent_at: float
    problem: str = ""
    back_pressure: bool = False
    retry_after: float = 0.0

    @property
    def log_ids(self) -> list[str]:
        """The prediction-log ids of its records."""
        if self.endpoint == PREDICT:
            return [self.request_id]
        return [f"{self.request_id}:{i}" for i in range(self.records)]


@dataclass
class Faults:
    """The faults asked for and when they happened (seconds since the load started)."""

    pause_s3: float = 0.0
    kill_server: bool = False
    at: float = 0.0
    paused: tuple[float, float] | None = None
    killed_at: float | None = None
    back_at: float | None = None  # the restarted server answered /ready
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.paused:
            parts.append(f"S3 paused (SIGSTOP) from {self.paused[0]:.1f} s to {self.paused[1]:.1f} s")
        if self.killed_at is not None:
            back = f", ready again at {self.back_at:.1f} s" if self.back_at is not None else ", NOT back"
            parts.append(f"server SIGKILLed at {self.killed_at:.1f} s{back}")
        return "; ".join(parts) or "none"


@dataclass
class Check:
    name: str
    expected: str
    observed: str
    ok: bool


class _Server:
    """The server under test, which ``--kill-server`` replaces by a new process on the same port."""

    def __init__(self, port: int, env: dict[str, str], workdir: Path) -> None:
        self.port, self.env, self.workdir = port, env, workdir
        self.processes: list[ServerProcess] = []

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def current(self) -> ServerProcess:
        return self.processes[-1]

    def start(self) -> None:
        name = "serving (this app)" + (f", restart {len(self.processes)}" if self.processes else "")
        log_path = self.workdir / f"serving-{len(self.processes)}.log"
        self.processes.append(ServerProcess(name, serving_command(self.port), self.env, f"{self.base}/ready", log_path))
        self.current.start()

    def kill(self) -> None:
        process = self.current.process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def stop_all(self, timeout: float) -> int | None:
        code = self.current.stop(timeout=timeout)
        for earlier in self.processes[:-1]:
            earlier.stop(timeout=5.0)
        return code


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
    moto_pid = _moto_pid(storage.endpoint_of(s3)) if args.pause_s3 else None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="load-test-"))
    pool = sample_records(spec, args.distinct_records, seed=args.seed)
    sizes = f"{args.batch_records:,}" if args.batch_records else f"2-{args.max_batch_records}"
    faults = Faults(args.pause_s3, args.kill_server, args.fault_at)
    print(f"model          {args.model_name}@{args.alias} = version {version} on {args.tracking_uri}")
    print(f"prediction log s3://{bucket}/{prefix}/" + (f" (spool {workdir / 'spool'})" if args.spool else ""))
    print(
        f"load           {args.seconds:g} s, {args.concurrency} concurrent streams, "
        f"{args.batch_share:.0%} batches of {sizes} records, "
        + (f"paced to {args.rate:g} requests/s" if args.rate else "unpaced (each stream sends when answered)")
    )
    if args.pause_s3 or args.kill_server:
        what = [f"S3 paused {args.pause_s3:g} s (moto pid {moto_pid})"] if args.pause_s3 else []
        what += ["server SIGKILLed and restarted"] if args.kill_server else []
        print(f"faults         {' then '.join(what)}, from {args.fault_at:g} s in")
    print(f"machine        {os.cpu_count()} CPUs, load average {load_average()} at the start")
    print(f"server logs    {workdir}", flush=True)

    api_key = secrets.token_urlsafe(24)
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
            "MAX_BATCH_SIZE": str(max(1000, args.max_batch_records, args.batch_records)),
        }
    )
    if args.spool:
        env["PREDICTION_LOG_SPOOL_DIR"] = str(workdir / "spool")
    for name in ("API_KEY_FILE", "ADMIN_API_KEY", "ADMIN_API_KEY_FILE", "MODELS"):
        env.pop(name, None)
    env.update(dict(item.split("=", 1) for item in args.server_env))
    server = _Server(free_port(), env, workdir)
    headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
    checks: list[Check] = []
    try:
        server.start()
        served = httpx.get(f"{server.base}/model", headers=headers, trust_env=False, timeout=10).json()
        if served["model_version"] != version:
            sys.exit(f"load test: the server loaded version {served['model_version']}, expected {version}")
        bodies = [json.dumps(record, separators=(",", ":")).encode() for record in pool]
        started = time.perf_counter()
        sent, finished_in_time = run_async(lambda: _load(server, headers, bodies, run, args, faults, moto_pid))
        elapsed = time.perf_counter() - started
        # Before the shutdown: what the counters say with the load just stopped.
        metrics = metric_values(server.base)
        print(f"load done in {elapsed:.1f} s; stopping the server (SIGTERM) ...", flush=True)
        exit_code = server.stop_all(timeout=args.shutdown_timeout)
        print(f"reading the prediction log back from s3://{bucket}/{prefix}/ ...", flush=True)
        objects, logged_ids, versions = _read_log(s3, bucket, prefix)
        checks = _checks(
            sent, finished_in_time, metrics, exit_code, server, faults, objects, logged_ids, versions, version
        )
        print(f"\nLoad ({elapsed:.1f} s; load average {load_average()} at the end; faults: {faults.describe()}):\n")
        print(_summary(sent, elapsed))
        rows = sum(logged_ids.values())
        print(f"\nPrediction log: {rows:,} rows in {objects:,} object(s) under s3://{bucket}/{prefix}/\n")
        print(table(["check", "expected", "observed", "result"], [_check_cells(c) for c in checks]))
        for problem in faults.problems:
            print(f"fault problem: {problem}")
    except ServerError as err:
        sys.exit(f"load test: {err}")
    finally:
        if moto_pid is not None:
            _signal(moto_pid, signal.SIGCONT)  # never leave the emulator stopped
        if server.processes:
            server.stop_all(timeout=5.0)
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
        "--batch-records", type=int, default=0, help="records of every batch request (default 0: 2 to the max)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests per second in all, 0 = as fast as answered (default 0)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds before a request counts as unanswered (default 60)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds the server gets to shut down and flush its log before SIGKILL (default 60)",
    )
    parser.add_argument(
        "--pause-s3", type=float, default=0.0, help="pause the S3 emulator (SIGSTOP) this many seconds (default 0)"
    )
    parser.add_argument(
        "--kill-server", action="store_true", help="SIGKILL the server mid-load and restart it (turns --spool on)"
    )
    parser.add_argument("--spool", action="store_true", help="run the server with its durable spool")
    parser.add_argument(
        "--fault-at", type=float, default=None, help="seconds into the load the faults start (default: centred)"
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
        help="extra setting for the server, e.g. PREDICTION_LOG_MAX_BUFFER=20000 (repeatable)",
    )
    parser.add_argument(
        "--distinct-records", type=int, default=5000, help="generated records drawn from (default 5000)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the records and of the request mix (default 7)")
    parser.add_argument("--workdir", help="folder for the server's logs and spool (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.request_timeout <= 0 or args.distinct_records < 1:
        parser.error("--seconds, --concurrency, --request-timeout and --distinct-records must be positive")
    if not 0 <= args.batch_share <= 1 or args.max_batch_records < 2 or args.rate < 0 or args.batch_records < 0:
        parser.error("--batch-share is between 0 and 1, --max-batch-records at least 2, --rate not negative")
    if args.pause_s3 < 0 or (args.fault_at is not None and not 0 <= args.fault_at < args.seconds):
        parser.error("--pause-s3 is not negative and --fault-at within the load")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    args.spool = args.spool or args.kill_server
    if args.fault_at is None:
        args.fault_at = max(0.0, (args.seconds - args.pause_s3) / 2)
    return args


def _moto_pid(endpoint: str) -> int:
    """The pid of the moto server behind ``endpoint``; exits unless it is one on loopback (nothing else is paused)."""
    import psutil

    url = urlparse(endpoint)
    if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
        sys.exit(f"load test: --pause-s3 pauses a local moto server; AWS_ENDPOINT_URL is {endpoint}")
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == url.port and connection.pid:
            process = psutil.Process(connection.pid)
            if any("moto" in part for part in process.cmdline()):
                return process.pid
            sys.exit(f"load test: port {url.port} is held by {' '.join(process.cmdline()[:3])}, not a moto server")
    sys.exit(f"load test: no process listens on {endpoint}")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


async def _load(
    server: _Server,
    headers: dict[str, str],
    bodies: list[bytes],
    run: str,
    args: argparse.Namespace,
    faults: Faults,
    moto_pid: int | None,
) -> tuple[list[Sent], bool]:
    """Send the mixed load until ``args.seconds`` have passed; returns the requests and whether it stopped in time."""
    sent: list[Sent] = []
    numbers = itertools.count()
    started = time.perf_counter()
    stop_sending = started + args.seconds
    base = server.base

    async def request(session: aiohttp.ClientSession, rng: random.Random, number: int) -> Sent:
        request_id = f"lt-{run}-{number}"
        if rng.random() < args.batch_share:
            count = args.batch_records or rng.randint(2, args.max_batch_records)
            chosen = [bodies[rng.randrange(len(bodies))] for _ in range(count)]
            endpoint, body = PREDICT_BATCH, b'{"records":[' + b",".join(chosen) + b"]}"
        else:
            chosen = [bodies[rng.randrange(len(bodies))]]
            endpoint, body = PREDICT, chosen[0]
        began = time.perf_counter()
        outcome = Sent(endpoint, request_id, len(chosen), None, math.nan, began - started)
        try:
            async with session.post(base + endpoint, data=body, headers={**headers, "X-Request-ID": request_id}) as r:
                payload = await r.read()
                outcome.status = r.status
                retry_after = r.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as err:
            outcome.problem = f"no answer: {type(err).__name__}"
            return outcome
        finally:
            outcome.seconds = time.perf_counter() - began
        if outcome.status == 200:
            outcome.problem = _answer_problem(endpoint, payload, request_id, len(chosen))
        elif outcome.status == 503 and retry_after is not None:
            outcome.problem = _detail(payload)
            outcome.back_pressure = outcome.problem.startswith(_BACK_PRESSURE) and retry_after.isdigit()
            outcome.retry_after = float(retry_after) if retry_after.isdigit() else 0.0
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
            outcome = await request(session, rng, number)
            sent.append(outcome)
            if outcome.retry_after:
                await asyncio.sleep(min(outcome.retry_after, max(0.0, stop_sending - time.perf_counter())))
            elif outcome.status is None:
                await asyncio.sleep(0.2)  # the server is down (killed): try again shortly

    async def inject() -> None:
        try:
            await asyncio.sleep(max(0.0, started + faults.at - time.perf_counter()))
            if faults.pause_s3 and moto_pid is not None:
                os.kill(moto_pid, signal.SIGSTOP)
                pause_start = time.perf_counter() - started
                try:
                    await asyncio.sleep(faults.pause_s3)
                finally:
                    os.kill(moto_pid, signal.SIGCONT)
                faults.paused = (pause_start, time.perf_counter() - started)
            if faults.kill_server:
                faults.killed_at = time.perf_counter() - started  # before the signal: requests fail from now on
                await asyncio.to_thread(server.kill)
                await asyncio.to_thread(server.start)
                faults.back_at = time.perf_counter() - started
        except Exception as err:  # reported as a failed check, the load goes on
            faults.problems.append(f"{type(err).__name__}: {err}")

    async with client_session(args.concurrency, timeout=args.request_timeout) as session:
        injector = asyncio.create_task(inject())
        streams = asyncio.gather(*(stream(i, session) for i in range(args.concurrency)))
        try:
            # Each request ends within its timeout, so this bound is only hit if something hangs.
            await asyncio.wait_for(streams, timeout=args.seconds + args.request_timeout + 10)
        except TimeoutError:
            return sent, False
        finally:
            await injector
    return sent, True


def _detail(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("detail", ""))
    except (ValueError, AttributeError):
        return ""


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


class _LoggedRow(msgspec.Struct):
    """The two keys of a logged record the checks need (the others are skipped, not parsed)."""

    request_id: str
    model_version: str


_ROWS = msgspec.json.Decoder(_LoggedRow)


def _read_log(s3: Any, bucket: str, prefix: str) -> tuple[int, Counter[str], Counter[str]]:
    """Objects under ``prefix``, and the request ids and model versions of their rows (counted)."""
    from tasks import storage

    keys = storage.list_keys(s3, bucket, prefix + "/")

    def rows(key: str) -> tuple[list[str], Counter[str]]:
        body = storage.get_bytes(s3, storage.S3Location(bucket, key))
        if key.endswith(".parquet"):  # the drift DAG reads both formats; the server writes JSON lines today
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(body), columns=["request_id", "model_version"]).to_pydict()
            return [str(i) for i in table["request_id"]], Counter(str(v) for v in table["model_version"])
        decoded = [_ROWS.decode(line) for line in body.splitlines() if line.strip()]
        return [r.request_id for r in decoded], Counter(r.model_version for r in decoded)

    ids: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for object_ids, object_versions in pool.map(rows, keys):
            ids.update(object_ids)
            versions.update(object_versions)
    return len(keys), ids, versions


def _checks(
    sent: list[Sent],
    finished_in_time: bool,
    metrics: dict[str, float],
    exit_code: int | None,
    server: _Server,
    faults: Faults,
    objects: int,
    logged: Counter[str],
    versions: Counter[str],
    version: str,
) -> list[Check]:
    restarted = len(server.processes) > 1
    answered = [s for s in sent if s.status == 200]
    shed = [s for s in sent if s.back_pressure]
    down = (faults.killed_at, faults.back_at if faults.back_at is not None else math.inf)

    def around_the_kill(s: Sent) -> bool:
        return down[0] is not None and s.sent_at <= down[1] and s.sent_at + s.seconds >= down[0]

    # The restarted server listens at once and says 503 (Retry-After) until its model is loaded.
    starting = [s for s in sent if s.status == 503 and s.problem.startswith(_NOT_READY) and around_the_kill(s)]
    excused_503 = {id(s) for s in starting}
    server_errors = [
        s for s in sent if s.status is not None and s.status >= 500 and not s.back_pressure and id(s) not in excused_503
    ]
    other = sum(1 for s in sent if s.status is not None and s.status != 200 and s.status < 500)
    # With a kill, requests cut off by it or sent while the server was down have no answer.
    unanswered = [s for s in sent if s.status is None]
    excused = [s for s in unanswered if around_the_kill(s)]
    unexcused = [s for s in unanswered if not around_the_kill(s)]
    wrong = [s for s in answered if s.problem]
    expected_ids = [log_id for s in answered for log_id in s.log_ids]
    records_sent = sum(s.records for s in sent)
    records_answered = len(expected_ids)
    expected = set(expected_ids)
    cut_off = {log_id for s in excused for log_id in s.log_ids}
    missing = len(expected - logged.keys())
    unexpected = sum(count for log_id, count in logged.items() if log_id not in expected and log_id not in cut_off)
    spooled_unanswered = sum(1 for log_id in logged if log_id in cut_off)
    # A request the kill cut off was spooled whole or not at all (never half of its records).
    halves = sum(0 < sum(1 for i in s.log_ids if i in logged) < s.records for s in excused)
    duplicated = sum(count - 1 for count in logged.values() if count > 1)
    logged_rows = sum(count for log_id, count in logged.items() if log_id in expected)
    enqueued = metrics.get("prediction_log_enqueued_total", math.nan)
    dropped = metrics.get("prediction_log_dropped_total", math.nan)
    problems = [line.strip() for line in _server_log(server.current).splitlines() if _LOG_ERROR.search(line)]
    clean_exit = exit_code in (0, -signal.SIGTERM)
    other_versions = sum(count for v, count in versions.items() if v != version)
    return [
        Check("requests sent", "> 0", f"{len(sent):,} ({records_sent:,} records)", bool(sent)),
        Check(
            "5xx answers (other than back-pressure)",
            "0",
            f"{len(server_errors):,}"
            + (f" (e.g. {server_errors[0].status} {server_errors[0].problem[:60]})" if server_errors else "")
            + (f"; {len(starting):,} 503 'no model loaded' from the restarted server" if restarted else ""),
            not server_errors,
        ),
        Check(
            "back-pressure: 503 with Retry-After (waited out)",
            "any",
            f"{len(shed):,} ({sum(s.records for s in shed):,} records not accepted)",
            True,
        ),
        Check(
            "requests without an answer",
            "0" + (" (but those the kill cut off)" if restarted else ""),
            f"{len(unanswered):,}"
            + (f" ({len(excused):,} around the kill)" if restarted else "")
            + (f" (e.g. sent at {unexcused[0].sent_at:.1f} s: {unexcused[0].problem})" if unexcused else ""),
            not unexcused,
        ),
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
            "records answered" if not restarted else "n/a (restarted process)",
            f"{enqueued:,.0f} of {records_answered:,} (buffered at stop: "
            f"{metrics.get('prediction_log_buffered_records', math.nan):,.0f})",
            enqueued == records_answered or restarted,
        ),
        Check("/metrics prediction_log_dropped_total", "0", f"{dropped:,.0f}", dropped == 0),
        Check(
            "server shut down cleanly, log free of errors",
            "SIGTERM exit, 0 error lines",
            f"exit {exit_code}, {len(problems)} error lines" + (f" (e.g. {problems[0][:80]})" if problems else ""),
            clean_exit and not problems,
        ),
        Check(
            "records answered 200 found in S3",
            f"{records_answered:,}",
            f"{logged_rows:,} in {objects:,} object(s)"
            + (f"; {spooled_unanswered:,} more from requests the kill cut off" if restarted else ""),
            logged_rows == records_answered,
        ),
        Check(
            "request ids logged: missing / unexpected / duplicated",
            "0 / 0 / 0",
            f"{missing:,} / {unexpected:,} / {duplicated:,}",
            missing == unexpected == duplicated == 0,
        ),
        Check(
            "requests the kill cut off, logged in part",
            "0",
            f"{halves:,}" + ("" if restarted else " (no kill)"),
            halves == 0,
        ),
        Check(f"rows logged with a version other than v{version}", "0", f"{other_versions:,}", other_versions == 0),
        Check("faults", "as asked, without error", faults.describe(), not faults.problems),
        Check(
            "records the restarted server replayed from the spool",
            "any" if restarted else "0",
            f"{metrics.get('prediction_log_replayed_total', 0):,.0f}",
            restarted or not metrics.get("prediction_log_replayed_total", 0),
        ),
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
        if not group:
            continue
        latencies = [s.seconds for s in group if s.status == 200]
        statuses = Counter(s.status for s in group)
        rows.append(
            [
                name,
                len(group),
                sum(s.records for s in group if s.status == 200),
                statuses.get(200, 0) / elapsed if elapsed > 0 else math.nan,
                1000 * percentile(latencies, 50),
                1000 * percentile(latencies, 95),
                1000 * percentile(latencies, 99),
                1000 * percentile(latencies, 100),
                statuses.get(200, 0),
                sum(n for status, n in statuses.items() if status is not None and 400 <= status < 500),
                sum(1 for s in group if s.back_pressure),
                sum(1 for s in group if s.status is not None and s.status >= 500 and not s.back_pressure),
                statuses.get(None, 0),
            ]
        )
    headers = ["endpoint", "requests", "records 200", "200/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "200", "4xx"]
    return table([*headers, "503 Retry-After", "5xx", "no answer"], rows)


def _check_cells(check: Check) -> list[str]:
    return [check.name, check.expected, check.observed, "PASS" if check.ok else "FAIL"]


if __name__ == "__main__":
    sys.exit(main())
