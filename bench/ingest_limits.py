"""Ingestion under large and hostile drops: peak memory and time of the ingest step, each in a fresh process.

Drops are generated into an S3 emulator (``moto_server`` on loopback, its own process, on
``MOTO_PORT`` when set) as multipart uploads built part by part, so nothing here holds a
whole drop in memory; each is deleted after its run. Against the default limits of the
``network_security`` spec (``tasks.dataset_spec.IngestLimits``):

* **good, baseline**: a good day read the way ingestion did before its limits (each file
  whole as bytes, then text, then ``splitlines`` for the header, then ``read_csv`` of every
  cell as text, then coerced, then ``duplicated()``, hashed, written), at ``--baseline-rows``;
* **good**: the same day through ``tasks.ingest.ingest_day``, and a day at ``--good-rows``
  (default: ``limits.max_rows``, in two files under ``limits.max_file_bytes``), and a day of
  ``intrusion_flows`` (float columns, ``drop_duplicates``) at ``--flows-rows``;
* **3 GB CSV**: one well-formed file of ``--hostile-gb`` GB (over ``max_file_bytes``);
* **10,000 columns**: one file of ``--wide-columns`` columns (over ``max_columns``, under
  ``max_file_bytes``).

A rejected drop is handled as the ingest task handles it (``DataRejected`` -> ``quarantine_drop``,
a server-side copy), inside the measured process. The table shows when the drop was rejected,
the wall time (with the quarantine copy, which for the 3 GB file is the emulator copying it), the process's
peak RSS (``VmHWM``), what the process does with no drop at all (imports only), and the
ratio against the baseline measured in the same run.

Usage::

    python -m bench.ingest_limits                       # everything (needs ~7 GB free for moto at 3 GB)
    python -m bench.ingest_limits --good-rows 1000000 --hostile-gb 0.5   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import moto_server

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATASET = "network_security"
PART_BYTES = 64 * 1024 * 1024  # multipart parts; moto needs >= 5 MiB but the last
DAYS = {
    "baseline": "2026-02-01",
    "good": "2026-02-02",
    "huge": "2026-02-03",
    "wide": "2026-02-04",
    "idle": "2026-02-05",
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_work(args.worker, args.endpoint, args.ds, args.dataset)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder:
        port = os.environ.get("MOTO_PORT")
        with moto_server(Path(folder), int(port) if port else None) as endpoint:
            return _compare(args, endpoint)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from tasks.dataset_spec import IngestLimits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--good-rows", type=int, default=IngestLimits().max_rows)
    parser.add_argument("--baseline-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--flows-rows", type=int, default=IngestLimits().max_rows, help="intrusion_flows (floats) day; 0: skip"
    )
    parser.add_argument("--hostile-gb", type=float, default=3.0)
    parser.add_argument("--wide-columns", type=int, default=10_000)
    parser.add_argument("--wide-rows", type=int, default=10_000)
    parser.add_argument("--worker", choices=["baseline", "project", "idle"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--ds", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default=DATASET, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )


def _layout(ds: str, dataset: str = DATASET) -> Any:
    from tasks.config import Settings
    from tasks.dataset_spec import load_spec
    from tasks.layout import DayLayout

    return DayLayout(Settings(), load_spec(dataset), ds)


# --- drops, generated part by part -----------------------------------------------------------


def _upload(client: Any, bucket: str, key: str, chunks: Iterator[bytes]) -> int:
    """A multipart upload of the concatenated chunks, holding one part at a time; returns bytes written."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts, pending, total = [], bytearray(), 0

    def flush() -> None:
        number = len(parts) + 1
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=bytes(pending))
        parts.append({"PartNumber": number, "ETag": etag["ETag"]})
        pending.clear()

    for chunk in chunks:
        pending.extend(chunk)
        total += len(chunk)
        if len(pending) >= PART_BYTES:
            flush()
    if pending or not parts:
        flush()
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    return total


def _good_rows(rows: int, seed: int, dataset: str = DATASET) -> Iterator[bytes]:
    """CSV of ``rows`` generated rows (header first), in chunks of 250k rows."""
    from tasks.datagen import generate

    spec = _layout(DAYS["good"], dataset).spec
    yield (",".join(spec.column_names) + "\n").encode()
    for start in range(0, rows, 250_000):
        frame = generate(spec, min(250_000, rows - start), seed=seed * 1000 + start // 250_000)
        yield frame.to_csv(index=False, header=False).encode()


def _repeated_rows(total_bytes: int) -> Iterator[bytes]:
    """A well-formed CSV of at least ``total_bytes``: the header, then one block of good rows repeated."""
    header, *chunks = _good_rows(250_000, seed=7)
    yield header
    written = len(header)
    while written < total_bytes:
        yield chunks[0]
        written += len(chunks[0])


def _wide_rows(columns: int, rows: int) -> Iterator[bytes]:
    yield (",".join(f"field_{i:05d}" for i in range(columns)) + "\n").encode()
    line = (",".join(["0"] * columns) + "\n").encode()
    for _ in range(0, rows, 100):
        yield line * 100


def _publish(client: Any, ds: str, files: dict[str, Iterator[bytes]], dataset: str) -> int:
    layout = _layout(ds, dataset)
    return sum(_upload(client, layout.raw_prefix.bucket, layout.raw_prefix.key + name, c) for name, c in files.items())


def _clean(client: Any, ds: str, dataset: str) -> None:
    from tasks import storage

    layout = _layout(ds, dataset)
    storage.delete_prefix(client, layout.raw_prefix.bucket, layout.raw_prefix.key)
    for location in (layout.snapshot_dir, layout.quarantine_dir):
        storage.delete_prefix(client, location.bucket, location.key + "/")


# --- one measured run (in a fresh process) ----------------------------------------------------


def _work(kind: str, endpoint: str, ds: str, dataset: str) -> dict[str, Any]:
    from tasks.ingest import DataRejected, ingest_day
    from tasks.validate import quarantine_drop

    client = _client(endpoint)
    layout = _layout(ds, dataset)
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "project":
        try:
            result = ingest_day(client, layout)
            out.update(result="snapshot", rows=result.rows, content_hash=result.content_hash)
        except DataRejected as err:  # what the ingest task does with it
            out["rejected_after"] = time.perf_counter() - started
            uri = quarantine_drop(client, layout, err.reason, "ingest", err.files)
            out.update(result="rejected", reason=err.reason, quarantine=uri)
    elif kind == "baseline":
        out.update(_baseline(client, layout))
    else:
        import pyarrow.csv  # noqa: F401  (what the ingest step imports, with no drop to read)

        out["result"] = "-"
    out["seconds"] = time.perf_counter() - started
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM).

    Not ``ru_maxrss``: Linux carries it over ``fork`` + ``exec``, so a worker would report
    the parent's size at the fork if that was larger.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline(client: Any, layout: Any) -> dict[str, Any]:
    """Ingestion before its limits: the bytes -> str -> splitlines -> copy -> frame chain, then the same steps."""
    import io

    import pandas as pd

    from tasks import storage
    from tasks.ingest import coerce_to_spec, content_hash

    prefix = layout.raw_prefix
    frames = []
    for key in storage.list_keys(client, prefix.bucket, prefix.key):
        body = client.get_object(Bucket=prefix.bucket, Key=key)["Body"].read()
        text = body.decode("utf-8")
        assert "," in text.splitlines()[0]
        frames.append(pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=True, skipinitialspace=True))
        del body, text
    frame = coerce_to_spec(pd.concat(frames, ignore_index=True), layout.spec)
    del frames
    duplicates = int(frame.duplicated().sum())
    digest = content_hash(frame)
    storage.write_parquet(client, layout.snapshot, frame, metadata={"content-sha256": digest})
    return {"result": "snapshot", "rows": len(frame), "duplicates": duplicates, "content_hash": digest}


def _measure(kind: str, endpoint: str, ds: str, dataset: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "bench.ingest_limits", "--worker", kind, "--endpoint", endpoint, "--ds", ds]
    command += ["--dataset", dataset]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, check=False)
    if done.returncode != 0:
        return {"result": f"DIED (exit {done.returncode})", "error": done.stderr[-2000:], "seconds": math.nan}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the comparison ------------------------------------------------------------------------


def _compare(args: argparse.Namespace, endpoint: str) -> int:
    from tasks.dataset_spec import load_spec

    limits = load_spec(DATASET).limits
    from tasks import storage

    client = _client(endpoint)
    settings = _layout(DAYS["idle"]).settings
    for bucket in (settings.raw_bucket, settings.lake_bucket):
        storage.ensure_bucket(client, bucket)
    rows: list[tuple[str, str, dict[str, Any]]] = []

    def run(
        label: str, kind: str, ds: str, files: dict[str, Iterator[bytes]], dataset: str = DATASET
    ) -> dict[str, Any]:
        size = _publish(client, ds, files, dataset) if files else 0
        try:
            measured = _measure(kind, endpoint, ds, dataset)
        finally:
            _clean(client, ds, dataset)
        rows.append((label, f"{size / 1e6:,.0f} MB" if size else "-", measured))
        return measured

    run("imports only (no drop)", "idle", DAYS["idle"], {})
    half = args.baseline_rows // 2
    day = {"part-0000.csv": _good_rows(half, 1), "part-0001.csv": _good_rows(args.baseline_rows - half, 2)}
    base = run(f"good {args.baseline_rows:,} rows, baseline", "baseline", DAYS["baseline"], day)
    day = {"part-0000.csv": _good_rows(half, 1), "part-0001.csv": _good_rows(args.baseline_rows - half, 2)}
    project = run(f"good {args.baseline_rows:,} rows", "project", DAYS["baseline"], day)
    if args.good_rows != args.baseline_rows:
        half = args.good_rows // 2
        day = {"part-0000.csv": _good_rows(half, 3), "part-0001.csv": _good_rows(args.good_rows - half, 4)}
        run(f"good {args.good_rows:,} rows (max_rows {limits.max_rows:,})", "project", DAYS["good"], day)
    if args.flows_rows:
        half = args.flows_rows // 2
        flows = "intrusion_flows"
        day = {
            "part-0000.csv": _good_rows(half, 5, flows),
            "part-0001.csv": _good_rows(args.flows_rows - half, 6, flows),
        }
        run(f"good {args.flows_rows:,} rows of {flows} (floats)", "project", DAYS["good"], day, flows)
    huge = {"part-0000.csv": _repeated_rows(int(args.hostile_gb * 1e9))}
    run(f"{args.hostile_gb:g} GB CSV", "project", DAYS["huge"], huge)
    wide = {"part-0000.csv": _wide_rows(args.wide_columns, args.wide_rows)}
    run(f"{args.wide_columns:,} columns x {args.wide_rows:,} rows", "project", DAYS["wide"], wide)

    print(
        f"\nlimits (default spec): max_file_bytes {limits.max_file_bytes:,}, max_columns {limits.max_columns:,}, "
        f"max_rows {limits.max_rows:,}, max_table_bytes {limits.max_table_bytes:,}\n"
    )
    print(f"{'drop':<50} {'size':>9} {'result':<10} {'rejected after s':>16} {'wall s':>8} {'peak RSS MB':>12}")
    for label, size, measured in rows:
        rejected = f"{measured['rejected_after']:.2f}" if "rejected_after" in measured else "-"
        print(
            f"{label:<50} {size:>9} {measured['result']:<10} {rejected:>16} {measured['seconds']:>8.1f} "
            f"{measured.get('peak_rss_mb', math.nan):>12.0f}"
        )
    if base.get("peak_rss_mb") and project.get("peak_rss_mb"):
        print(
            f"\nat {args.baseline_rows:,} rows, project / baseline: peak RSS x{project['peak_rss_mb'] / base['peak_rss_mb']:.2f}, "
            f"time x{project['seconds'] / base['seconds']:.2f}; same content hash: "
            f"{project.get('content_hash') == base.get('content_hash')}"
        )
    for label, _, measured in rows:
        if measured.get("reason") or measured.get("error"):
            print(f"\n{label}: {measured.get('reason') or measured.get('error')}")
    return 0 if all(not m["result"].startswith("DIED") for _, _, m in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
