"""Serving benchmark: this server against ``mlflow models serve`` and the in-process floor.

The registry's ``<name>@<alias>`` (default ``network_security@champion``) on the tracking
server ``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``) is resolved once to a version,
and that version is measured three ways in the same run:

(a) this server, ``python -m serving`` as a uvicorn subprocess on loopback, with an API key
    and, as deployed, its prediction log on (to a throw-away ``bench/`` prefix of the lake
    bucket, deleted afterwards; ``--no-prediction-log`` turns it off): single-record
    ``POST /predict`` at each ``--concurrency`` for ``--seconds`` each, and
    ``--batch-repeats`` ``POST /predict/batch`` of ``--batch-records`` records (its
    ``MAX_BATCH_SIZE``, 1,000 by default, is raised to fit), twice: each sent to an idle
    server (its prediction log done writing the previous one), then back to back (the
    log's writer then competes with scoring for the interpreter; it never drops a record:
    past its high-water mark the server would answer 503, counted as errors here);
(b) the baseline, ``mlflow models serve -m models:/<name>/<version> --env-manager local``
    (one worker, its default, like (a)): the same records on ``/invocations`` as
    ``dataframe_split`` payloads;
(c) in process, the floor: ``pipeline.predict_proba`` of one row and of the batch, and the
    same through the server's predictor (``serving.predictor``), without HTTP or JSON.

The two servers run one after the other, never together, and must give the same labels
for the batch (checked). Load comes from this process (aiohttp on uvloop, one keep-alive
connection per worker): each worker sends its next request when the previous one is
answered; the answers received after ``--warmup``, within the measured window, count. On
a small machine the load generator takes CPU from the server, and so does anything else
running: the load average is printed with the results.

Usage (a champion registered, e.g. by ``make run``; ``source .state/env.sh`` first)::

    python -m bench.serving
    python -m bench.serving --seconds 3 --concurrency 8 --skip-mlflow   # quick look

Prints one table (each row with the 1-minute load average while it was measured: the
machine is shared), the ratios of this server to ``mlflow models serve`` and the targets:
throughput >= 10x mlflow serve at concurrency 8 and 32, single-record p99 < 25 ms at
concurrency 8, the idle 10,000-record batch at most 2x the in-process compiled predictor's
(medians), back-to-back 10,000-record batches faster than mlflow serve (medians) with the
prediction log on and nothing dropped. ``--enforce-targets`` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    LOOPBACK,
    LoadResult,
    ServerError,
    ServerProcess,
    base_environment,
    client_session,
    closed_loop,
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
from tasks.dataset_spec import DatasetSpec, load_spec

THIS_SERVER = "serving (this app)"
MLFLOW_SERVE = "mlflow models serve"
SINGLE = "1 record"
TARGET_SPEEDUP = 10.0
TARGET_P99_MS = 25.0
TARGET_BATCH_FLOOR_RATIO = 2.0  # idle batch p50 over the in-process compiled predictor's p50
TARGET_BATCH_RECORDS = 10_000
COMPILED_IN_PROCESS = "in-process serving predictor"


@dataclass
class Row:
    """One line of the results table.

    ``records_per_call`` is the mean number of single-record requests this server scored
    per model call (its micro-batching), NaN where it does not apply.
    """

    system: str
    workload: str
    concurrency: int
    requests: int
    per_second: float
    records_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    records_per_call: float = math.nan
    load: float = dataclasses.field(default_factory=lambda: os.getloadavg()[0])

    @classmethod
    def of_load(cls, system: str, workload: str, concurrency: int, result: LoadResult, records: int) -> Row:
        return cls(
            system,
            workload,
            concurrency,
            result.ok,
            result.per_second(),
            result.per_second() * records,
            result.ms(50),
            result.ms(95),
            result.ms(99),
            result.ms(100),
            result.failed,
        )

    @classmethod
    def of_timings(cls, system: str, workload: str, seconds: Sequence[float], records: int, errors: int = 0) -> Row:
        mean = sum(seconds) / len(seconds) if seconds else math.nan
        return cls(
            system,
            workload,
            1,
            len(seconds),
            1 / mean if mean > 0 else math.nan,
            records / mean if mean > 0 else math.nan,
            1000 * percentile(seconds, 50),
            1000 * percentile(seconds, 95),
            1000 * percentile(seconds, 99),
            1000 * percentile(seconds, 100),
            errors,
        )


@dataclass
class LogTarget:
    """Where this server's prediction log goes during the benchmark."""

    client: Any
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    spec = load_spec(args.dataset)
    version = resolve_alias(args.tracking_uri, args.model_name, args.alias, "bench")
    log_target = None if args.no_prediction_log else _log_target(args)
    singles = sample_records(spec, args.records, seed=11)
    batch = sample_records(spec, args.batch_records, seed=12)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serving-"))
    print(f"model          {args.model_name}@{args.alias} = version {version} on {args.tracking_uri}")
    print(f"machine        {os.cpu_count()} CPUs, load average {load_average()} at the start")
    print(f"prediction log {log_target.uri + ' (deleted afterwards)' if log_target else 'off'}")
    print(f"server logs    {workdir}", flush=True)
    rows: list[Row] = []
    answers: dict[str, list[Any]] = {}
    log_stats: dict[str, float] | None = None
    try:
        if not args.skip_in_process:
            rows += _in_process(args, spec, f"models:/{args.model_name}/{version}", singles, batch)
        ours, answers[THIS_SERVER], log_stats = _this_server(args, version, singles, batch, workdir, log_target)
        rows += ours
        if not args.skip_mlflow:
            theirs, answers[MLFLOW_SERVE] = _mlflow_serve(args, spec, version, singles, batch, workdir)
            rows += theirs
    except ServerError as err:
        sys.exit(f"bench: {err}")
    finally:
        if log_target is not None:
            _delete_log(log_target)

    print(f"\nResults ({args.model_name} v{version}; load average {load_average()} at the end):\n")
    print(table(_HEADERS, [_cells(row) for row in rows]))
    verdicts = _report(rows, args, answers, log_stats)
    if args.json:
        plain = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()} for r in rows]
        payload = {"model_version": version, "load_average": os.getloadavg(), "rows": plain}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 1 if args.enforce_targets and not all(verdicts) else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description="Latency and throughput of the model server vs `mlflow models serve` and the in-process floor.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5050",
        help="MLflow tracking server holding the registry (default $MLFLOW_TRACKING_URI, else http://127.0.0.1:5050)",
    )
    parser.add_argument("--model-name", default="network_security", help="registered model (default network_security)")
    parser.add_argument("--alias", default="champion", help="alias resolved to the version measured (default champion)")
    parser.add_argument(
        "--dataset", default="network_security", help="dataset spec of the model (default network_security)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per concurrency level (default 10)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level (default 2)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent workers (default 1 8 32)"
    )
    parser.add_argument(
        "--batch-records", type=int, default=TARGET_BATCH_RECORDS, help="records of the batch request (default 10000)"
    )
    parser.add_argument("--batch-repeats", type=int, default=20, help="batch requests measured (default 20)")
    parser.add_argument("--records", type=int, default=2000, help="distinct single records sent in turn (default 2000)")
    parser.add_argument(
        "--no-prediction-log",
        action="store_true",
        help="run this server with its prediction log off (default: on, as deployed, to a throw-away prefix)",
    )
    parser.add_argument(
        "--prediction-log-bucket",
        default="",
        help="bucket of the prediction log (default the lake bucket, NS_LAKE_BUCKET or network-security-lake); "
        "S3 is boto3's AWS_ENDPOINT_URL and credentials",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for this server, e.g. MICRO_BATCH_WINDOW_MS=0 (repeatable)",
    )
    parser.add_argument(
        "--mlflow-workers",
        type=int,
        default=1,
        help="uvicorn workers of `mlflow models serve` (default 1, its default)",
    )
    parser.add_argument("--skip-mlflow", action="store_true", help="do not run `mlflow models serve`")
    parser.add_argument("--skip-in-process", action="store_true", help="do not measure the in-process floor")
    parser.add_argument("--workdir", help="folder for the servers' logs (default: a new temporary folder)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--enforce-targets", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.batch_repeats < 1 or args.records < 1 or args.batch_records < 1:
        parser.error("--seconds, --batch-repeats, --records and --batch-records must be positive, --warmup >= 0")
    if any(c < 1 for c in args.concurrency) or args.mlflow_workers < 1:
        parser.error("--concurrency levels and --mlflow-workers must be positive")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    return args


def _log_target(args: argparse.Namespace) -> LogTarget:
    """The bucket and a fresh prefix for this run's prediction log; exits when the bucket is unreachable."""
    from serving.prediction_log import default_s3_client
    from tasks import storage
    from tasks.config import Settings

    bucket = args.prediction_log_bucket or Settings.load().lake_bucket
    client = default_s3_client()
    try:
        with storage.reachable(client):
            client.head_bucket(Bucket=bucket)
    except Exception as err:
        sys.exit(
            f"bench: the prediction log's bucket {bucket!r} is not reachable at {storage.endpoint_of(client)} "
            f"({err}); source the stack's env.sh (AWS_ENDPOINT_URL, credentials) or pass --no-prediction-log"
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return LogTarget(client, bucket, f"bench/serving-{stamp}-{secrets.token_hex(3)}")


def _delete_log(target: LogTarget) -> None:
    from tasks import storage

    try:
        storage.delete_prefix(target.client, target.bucket, target.prefix)
    except Exception as err:  # cleaning up must not hide the results
        print(f"bench: could not delete {target.uri}: {err}", file=sys.stderr)


def _in_process(
    args: argparse.Namespace, spec: DatasetSpec, model_uri: str, singles: list[dict], batch: list[dict]
) -> list[Row]:
    import mlflow
    import mlflow.sklearn
    import pandas as pd

    from serving.predictor import build_predictor

    print("measuring in process ...", flush=True)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_registry_uri(args.tracking_uri)
    pipeline = mlflow.sklearn.load_model(model_uri)
    dtypes = {c.name: c.dtype for c in spec.features}
    frames = [pd.DataFrame([record]).astype(dtypes) for record in singles[:200]]
    batch_frame = pd.DataFrame(batch).astype(dtypes)
    predictor = build_predictor(pipeline, spec.features)
    names = spec.feature_names
    tuples = [tuple(record[n] for n in names) for record in singles[:200]]
    batch_tuples = [tuple(record[n] for n in names) for record in batch]
    workload = f"{len(batch):,} records"
    served = f"{COMPILED_IN_PROCESS} ({predictor.kind})"
    return [
        Row.of_timings(
            "in-process pipeline.predict_proba",
            SINGLE,
            _time_for(lambda i: pipeline.predict_proba(frames[i % len(frames)]), args.seconds),
            1,
        ),
        Row.of_timings(
            "in-process pipeline.predict_proba",
            workload,
            _time_each(lambda _: pipeline.predict_proba(batch_frame), args.batch_repeats),
            len(batch),
        ),
        Row.of_timings(
            served, SINGLE, _time_for(lambda i: predictor.predict([tuples[i % len(tuples)]]), args.seconds), 1
        ),
        Row.of_timings(
            served, workload, _time_each(lambda _: predictor.predict(batch_tuples), args.batch_repeats), len(batch)
        ),
    ]


def _time_for(call: Callable[[int], Any], seconds: float) -> list[float]:
    call(0)  # warm caches
    timings: list[float] = []
    end = time.perf_counter() + seconds
    while (started := time.perf_counter()) < end:
        call(len(timings))
        timings.append(time.perf_counter() - started)
    return timings


def _time_each(call: Callable[[int], Any], repeats: int) -> list[float]:
    call(0)
    timings = []
    for i in range(repeats):
        started = time.perf_counter()
        call(i)
        timings.append(time.perf_counter() - started)
    return timings


def _this_server(
    args: argparse.Namespace,
    version: str,
    singles: list[dict],
    batch: list[dict],
    workdir: Path,
    log_target: LogTarget | None,
) -> tuple[list[Row], list[Any], dict[str, float] | None]:
    """This server's rows, its labels for the batch and its prediction log's counters (None when off)."""
    port, api_key = free_port(), secrets.token_urlsafe(24)
    env = base_environment()
    env.update(
        {
            "MLFLOW_TRACKING_URI": args.tracking_uri,
            "MODEL_NAME": args.model_name,
            "MODEL_VERSION": version,  # exactly the version mlflow serve gets, even if the alias moves meanwhile
            "DATASET": args.dataset,
            "API_KEY": api_key,
            "MAX_BATCH_SIZE": str(max(1000, len(batch))),
            "PREDICTION_LOG_BUCKET": log_target.bucket if log_target else "",
            "PREDICTION_LOG_PREFIX": log_target.prefix if log_target else "predictions",
            "ALIAS_POLL_SECONDS": "0",
        }
    )
    env.pop("API_KEY_FILE", None)
    env.update(dict(item.split("=", 1) for item in args.server_env))
    base = f"http://{LOOPBACK}:{port}"
    server = ServerProcess(THIS_SERVER, serving_command(port), env, f"{base}/ready", workdir / "serving.log")
    headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
    print(f"starting {THIS_SERVER} on {base} ...", flush=True)
    with server:
        served = httpx.get(f"{base}/model", headers=headers, trust_env=False).json()["model_version"]
        if served != version:
            sys.exit(f"bench: the server loaded version {served}, expected {version}")
        single_bodies = [json.dumps(record).encode() for record in singles]
        batch_body = json.dumps({"records": batch}).encode()
        _check(base + "/predict", single_bodies[0], headers, lambda body: "label" in body)
        answer = _check(
            base + "/predict/batch", batch_body, headers, lambda body: len(body["predictions"]) == len(batch)
        )

        def records_per_call() -> tuple[float, float]:
            values = metric_values(base)
            return values.get("predict_micro_batch_records_sum", 0.0), values.get(
                "predict_micro_batch_records_count", 0.0
            )

        rows = _load_cells(
            args,
            THIS_SERVER,
            base + "/predict",
            single_bodies,
            base + "/predict/batch",
            batch_body,
            headers,
            len(batch),
            records_per_call,
            settle=(lambda: _drained_log_stats(base)) if log_target is not None else None,
        )
        stats = None
        if log_target is not None:
            stats = _drained_log_stats(base)
            print(
                f"  {THIS_SERVER}: prediction log {stats.get('prediction_log_enqueued_total', 0):,.0f} records "
                f"queued, {stats.get('prediction_log_written_total', 0):,.0f} written to {log_target.uri}, "
                f"{stats.get('prediction_log_dropped_total', 0):,.0f} dropped, "
                f"{stats.get('prediction_log_buffered_records', 0):,.0f} still buffered",
                flush=True,
            )
    return rows, [prediction["label"] for prediction in answer["predictions"]], stats


def _drained_log_stats(base: str, timeout: float = 60.0) -> dict[str, float]:
    """The server's metrics once its prediction log has written what it queued (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (stats := metric_values(base)).get("prediction_log_buffered_records", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return stats


def _mlflow_serve(
    args: argparse.Namespace, spec: DatasetSpec, version: str, singles: list[dict], batch: list[dict], workdir: Path
) -> tuple[list[Row], list[Any]]:
    """The baseline's rows and its labels for the batch."""
    port = free_port()
    env = base_environment()
    env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    model_uri = f"models:/{args.model_name}/{version}"
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-h", LOOPBACK, "-p", str(port), "-w", str(args.mlflow_workers),
    ]  # fmt: skip
    base = f"http://{LOOPBACK}:{port}"
    server = ServerProcess(MLFLOW_SERVE, command, env, f"{base}/ping", workdir / "mlflow-serve.log")
    headers = {"Content-Type": "application/json"}
    names = spec.feature_names

    def split(records: list[dict]) -> bytes:
        data = [[record[n] for n in names] for record in records]
        return json.dumps({"dataframe_split": {"columns": names, "data": data}}).encode()

    print(f"starting {MLFLOW_SERVE} on {base} ...", flush=True)
    with server:
        single_bodies = [split([record]) for record in singles]
        batch_body = split(batch)
        url = base + "/invocations"
        _check(url, single_bodies[0], headers, lambda body: len(body["predictions"]) == 1)
        answer = _check(url, batch_body, headers, lambda body: len(body["predictions"]) == len(batch))
        rows = _load_cells(args, MLFLOW_SERVE, url, single_bodies, url, batch_body, headers, len(batch))
    return rows, list(answer["predictions"])


def _check(url: str, body: bytes, headers: dict[str, str], looks_right: Callable[[Any], bool]) -> Any:
    """POST once and return the JSON answer; exits when it is not a 200 that looks right."""
    response = httpx.post(url, content=body, headers=headers, timeout=120.0, trust_env=False)
    if response.status_code != 200 or not looks_right(response.json()):
        sys.exit(f"bench: {url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def _load_cells(
    args: argparse.Namespace,
    system: str,
    single_url: str,
    single_bodies: list[bytes],
    batch_url: str,
    batch_body: bytes,
    headers: dict[str, str],
    batch_records: int,
    micro_batches: Callable[[], tuple[float, float]] | None = None,
    settle: Callable[[], Any] | None = None,
) -> list[Row]:
    """Single records at each concurrency level, then the batch, against one server.

    The batch is measured twice: each request sent to an idle server (after the previous
    answer and, with ``settle``, once the server's background work for it, its
    prediction log, is done), then back to back, each sent as soon as the previous one
    is answered.
    """
    rows = []
    for concurrency in args.concurrency:
        print(
            f"  {system}: 1 record, concurrency {concurrency}, {args.warmup:g}+{args.seconds:g} s "
            f"(load average {load_average()})",
            flush=True,
        )

        async def singles(concurrency: int = concurrency) -> LoadResult:
            async with client_session(concurrency) as session:
                return await closed_loop(
                    session,
                    single_url,
                    single_bodies,
                    headers,
                    concurrency=concurrency,
                    seconds=args.seconds,
                    warmup=args.warmup,
                )

        before = micro_batches() if micro_batches else None
        row = Row.of_load(system, SINGLE, concurrency, run_async(singles), 1)
        if micro_batches and before:
            # Over warm-up and window alike: the server cannot tell them apart.
            (records_before, calls_before), (records_after, calls_after) = before, micro_batches()
            calls = calls_after - calls_before
            row.records_per_call = (records_after - records_before) / calls if calls else math.nan
        rows.append(row)
    for workload, wait in ((_idle(batch_records), settle), (_back_to_back(batch_records), None)):
        print(f"  {system}: {workload} x {args.batch_repeats} (load average {load_average()})", flush=True)

        async def batches(wait: Callable[[], Any] | None = wait) -> tuple[list[float], int]:
            timings, errors = [], 0
            async with client_session(1, timeout=300.0) as session:
                async with session.post(batch_url, data=batch_body, headers=headers) as response:  # warm-up
                    await response.read()
                for _ in range(args.batch_repeats):
                    if wait is not None:
                        wait()  # blocks the loop, which has nothing else to do
                    started = time.perf_counter()
                    async with session.post(batch_url, data=batch_body, headers=headers) as response:
                        await response.read()
                        status = response.status
                    if status == 200:
                        timings.append(time.perf_counter() - started)
                    else:
                        errors += 1
            return timings, errors

        timings, errors = run_async(batches)
        rows.append(Row.of_timings(system, workload, timings, batch_records, errors))
    return rows


def _idle(records: int) -> str:
    return f"{records:,} records, server idle"


def _back_to_back(records: int) -> str:
    return f"{records:,} records, back to back"


_HEADERS = [
    "system",
    "workload",
    "conc.",
    "requests",
    "req/s",
    "records/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "errors",
    "rec/call",
    "load",
]


def _cells(row: Row) -> list[Any]:
    return [
        row.system,
        row.workload,
        row.concurrency,
        row.requests,
        row.per_second,
        row.records_per_second,
        row.p50_ms,
        row.p95_ms,
        row.p99_ms,
        row.max_ms,
        row.errors,
        row.records_per_call,
        row.load,
    ]


def _report(
    rows: list[Row], args: argparse.Namespace, answers: dict[str, list[Any]], log_stats: dict[str, float] | None
) -> list[bool]:
    """Print the ratios to mlflow serve, the checks and the targets; returns one verdict per item checked."""
    ours = {(r.workload, r.concurrency): r for r in rows if r.system == THIS_SERVER}
    theirs = {(r.workload, r.concurrency): r for r in rows if r.system == MLFLOW_SERVE}
    batch_workloads = (_idle(args.batch_records), _back_to_back(args.batch_records))
    ratios = []
    for key, row in ours.items():
        other = theirs.get(key)
        if other is None:
            continue
        if key[0] in batch_workloads:
            speedup = other.p50_ms / row.p50_ms if row.p50_ms > 0 else math.nan
            ratios.append([f"{key[0]} (latency, p50 ms)", key[1], row.p50_ms, other.p50_ms, speedup])
        else:
            ratios.append(
                [f"{key[0]} (throughput, req/s)", key[1], row.per_second, other.per_second, _ratio(row, other)]
            )
    if ratios:
        print("\nThis server vs mlflow models serve (x = how many times better):\n")
        print(table(["workload", "conc.", THIS_SERVER, MLFLOW_SERVE, "x"], ratios))

    verdicts: list[bool] = []
    lines: list[tuple[str, str]] = []

    def verdict(ok: bool, text: str) -> None:
        verdicts.append(ok)
        lines.append(("PASS" if ok else "MISS", text))

    if THIS_SERVER in answers and MLFLOW_SERVE in answers:
        mine, baseline = answers[THIS_SERVER], answers[MLFLOW_SERVE]
        agree = sum(a == b for a, b in zip(mine, baseline, strict=True))
        verdict(agree == len(mine), f"same labels as mlflow serve for the batch: {agree:,}/{len(mine):,} agree")
    failed = [r for r in rows if r.errors and r.system in (THIS_SERVER, MLFLOW_SERVE)]
    for r in failed:
        print(f"\nwarning: {r.system}, {r.workload} at concurrency {r.concurrency}: {r.errors} failed requests")

    for concurrency in (8, 32):
        row, other = ours.get((SINGLE, concurrency)), theirs.get((SINGLE, concurrency))
        if row and other:
            ratio = _ratio(row, other)
            verdict(
                ratio >= TARGET_SPEEDUP and row.errors == 0,
                f"throughput >= {TARGET_SPEEDUP:g}x mlflow serve at concurrency {concurrency}: "
                f"{ratio:.1f}x ({row.per_second:,.0f} vs {other.per_second:,.0f} req/s)",
            )
    row = ours.get((SINGLE, 8))
    if row:
        verdict(
            row.p99_ms < TARGET_P99_MS and row.errors == 0,
            f"single-record p99 < {TARGET_P99_MS:g} ms at concurrency 8: {row.p99_ms:.1f} ms",
        )
    idle, sustained = ours.get((batch_workloads[0], 1)), ours.get((batch_workloads[1], 1))
    floor = next(
        (
            r
            for r in rows
            if r.system.startswith(COMPILED_IN_PROCESS) and r.workload == f"{args.batch_records:,} records"
        ),
        None,
    )
    if idle and floor and args.batch_records == TARGET_BATCH_RECORDS:
        ratio = idle.p50_ms / floor.p50_ms if floor.p50_ms > 0 else math.inf
        verdict(
            ratio <= TARGET_BATCH_FLOOR_RATIO and idle.errors == 0,
            f"{TARGET_BATCH_RECORDS:,}-record batch, server idle, <= {TARGET_BATCH_FLOOR_RATIO:g}x the in-process "
            f"compiled predictor (medians): {ratio:.2f}x ({idle.p50_ms:.0f} vs {floor.p50_ms:.0f} ms)",
        )
    other = theirs.get((batch_workloads[1], 1))
    if sustained and other and args.batch_records == TARGET_BATCH_RECORDS:
        speedup = other.p50_ms / sustained.p50_ms if sustained.p50_ms > 0 else math.nan
        verdict(
            speedup > 1 and sustained.errors == 0,
            f"back-to-back {TARGET_BATCH_RECORDS:,}-record batches faster than mlflow serve (medians): "
            f"{speedup:.2f}x ({sustained.p50_ms:.0f} vs {other.p50_ms:.0f} ms)",
        )
    if log_stats is not None:
        dropped = log_stats.get("prediction_log_dropped_total", math.nan)
        queued, written = (
            log_stats.get("prediction_log_enqueued_total", 0),
            log_stats.get("prediction_log_written_total", 0),
        )
        verdict(
            dropped == 0 and written == queued,
            f"prediction log on, nothing dropped: {queued:,.0f} queued, {written:,.0f} written, {dropped:,.0f} dropped",
        )
    if lines:
        print("\nChecks and targets:")
        for mark, text in lines:
            print(f"  {mark}  {text}")
    if not (ours and theirs):
        print("\n(targets against mlflow serve need both servers measured)")
    return verdicts


def _ratio(row: Row, other: Row) -> float:
    return row.per_second / other.per_second if other.per_second > 0 else math.inf


if __name__ == "__main__":
    sys.exit(main())
