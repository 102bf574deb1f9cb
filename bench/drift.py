"""Drift benchmark: the drift DAG's computation at 100k, 1M and 10M current rows × 30 features.

For each size, a day of prediction log (24 hourly parquet objects with every column the
serving app logs: request id, timestamp, model name and version, the 30 features, label,
probability) is written to an S3 emulator (``moto_server`` on loopback, its own process),
with a mild drift on the features so some of them cross the PSI threshold and some do not.
Then, each in a fresh process so its peak memory is its own:

* **project**: what ``check_drift`` does: ``tasks.drift.read_window`` (column-projected,
  compact dtypes, filtered to the champion) → ``sample`` above ``sample_cap`` (1M, fixed
  seed) → Evidently ``DataDriftPreset(method="psi", threshold=0.25)`` → ``summarize``;
* **baseline**: the straightforward version: every object read whole with pandas
  (default dtypes), filtered to the champion, Evidently on the full data.

Both compare against the same reference (a 20k-row training snapshot scored by a logistic
regression fitted on it, as the champion would score it). The table shows wall time and
peak RSS of each and whether their retrain decisions (drift detected, drifted features)
agree. Targets: 10M rows within 60 s and 2 GB peak for the project's step.

Usage::

    python -m bench.drift                         # 100k, 1M, 10M
    python -m bench.drift --rows 100000 1000000   # quicker
    python -m bench.drift --format jsonl --rows 100000 1000000   # the serving app's JSON lines
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import load_average, moto_server, table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench-lake"
PREFIX = "predictions"
DAY = "2026-01-15"
MODEL = ("network_security", "7")
THRESHOLD = 0.25
SAMPLE_CAP = 1_000_000
DRIFT = 0.5  # the datagen knob: at 0.5 some features cross PSI 0.25, most do not
TARGET_SECONDS, TARGET_MB = 60.0, 2048.0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_work(args.worker, args.rows[0], args.endpoint, args.format)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as folder:
        with moto_server(Path(folder)) as endpoint:
            return _compare(args, endpoint)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument(
        "--format",
        choices=["parquet", "jsonl"],
        default="parquet",
        help="prediction-log objects: parquet (default) or JSON lines, as the serving app writes them",
    )
    parser.add_argument("--skip-baseline-above", type=int, default=None, help="no baseline above this many rows")
    parser.add_argument("--worker", choices=["project", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )


def _scorer(spec: Any) -> Any:
    """A logistic regression fitted on the reference: the 'champion' that scored the log."""
    from sklearn.linear_model import LogisticRegression

    from tasks.datagen import generate

    reference = generate(spec, 20_000, seed=1)
    model = LogisticRegression(max_iter=500).fit(reference[spec.feature_names], reference[spec.target.name])
    positive = list(model.classes_).index(spec.positive_class)
    return reference, lambda frame: model.predict_proba(frame[spec.feature_names])[:, positive].astype("float32")


def _reference_key() -> str:
    return "reference/data.parquet"


def _publish(endpoint: str, rows: int, fmt: str) -> float:
    """The reference snapshot and a day of prediction log (24 hourly objects); returns seconds spent."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.datagen import DriftKnob, generate
    from tasks.dataset_spec import load_spec

    started = time.perf_counter()
    spec = load_spec("network_security")
    client = _client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    reference, score = _scorer(spec)
    reference = reference[spec.feature_names].assign(probability=score(reference))
    buffer = io.BytesIO()
    reference.to_parquet(buffer, index=False)
    client.put_object(Bucket=BUCKET, Key=_reference_key(), Body=buffer.getvalue())

    per_hour = np.diff(np.linspace(0, rows, 25).astype(int))
    for hour, count in enumerate(per_hour):
        frame = generate(spec, int(count), seed=1000 + hour, knob=DriftKnob(feature_drift=DRIFT))
        base = np.datetime64(f"{DAY}T{hour:02d}:00:00", "ms")
        stamps = base + np.sort(np.random.default_rng(hour).integers(0, 3_600_000, int(count))).astype(
            "timedelta64[ms]"
        )
        ids = pa.array(np.arange(int(count), dtype=np.int64) + hour * 10**9)
        columns = {
            "request_id": pc.cast(ids, pa.string()),
            "timestamp": pc.cast(pa.array(stamps), pa.string()),
            "model_name": pa.array(np.full(int(count), MODEL[0], dtype=object)),
            "model_version": pa.array(np.full(int(count), MODEL[1], dtype=object)),
            **{name: pa.array(frame[name].to_numpy()) for name in spec.feature_names},
            "label": pa.array(frame[spec.target.name].to_numpy()),
            "probability": pa.array(score(frame)),
        }
        buffer = io.BytesIO()
        if fmt == "parquet":
            pq.write_table(pa.table(columns), buffer)
        else:
            pa.table(columns).to_pandas().to_json(buffer, orient="records", lines=True)
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/dt={DAY}/{hour:02d}/part-0.{fmt}", Body=buffer.getvalue())
    return time.perf_counter() - started


def _partitions() -> list[str]:
    return [f"dt={DAY}/{hour:02d}" for hour in range(24)]


def _work(kind: str, rows: int, endpoint: str, fmt: str) -> dict[str, Any]:
    """One measured run, in this (fresh) process: seconds, peak RSS, decision."""
    import pandas as pd

    from tasks import drift, storage
    from tasks.dataset_spec import load_spec

    spec = load_spec("network_security")
    client = _client(endpoint)
    started = time.perf_counter()
    reference = storage.read_parquet(client, storage.S3Location(BUCKET, _reference_key()))
    if kind == "project":
        window, read, _ = drift.read_window(client, BUCKET, PREFIX, _partitions(), spec, MODEL)
        evaluated = drift.sample(window, SAMPLE_CAP, seed=0)
        current = drift.to_frame(evaluated, spec)
        del window
        counts = {"current": read, "evaluated": evaluated.num_rows}
    else:
        frames = []
        for partition in _partitions():
            for key in storage.list_keys(client, BUCKET, f"{PREFIX}/{partition}/"):
                body = io.BytesIO(storage.get_bytes(client, storage.S3Location(BUCKET, key)))
                frames.append(pd.read_parquet(body) if fmt == "parquet" else pd.read_json(body, lines=True))
        everything = pd.concat(frames, ignore_index=True)
        del frames
        # JSON has no types: pandas reads version "7" as the number 7.
        version = everything["model_version"].astype(str)
        current = everything[(everything["model_name"] == MODEL[0]) & (version == MODEL[1])]
        counts = {"current": len(everything), "evaluated": len(current)}
    _, psi = drift.psi_report(reference, current, spec, THRESHOLD)
    champion = {"model_name": MODEL[0], "model_version": MODEL[1], "run_id": "bench", "snapshot_uris": []}
    summary = drift.summarize(
        psi, THRESHOLD, window={}, rows={**counts, "reference": len(reference)}, champion=champion
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": counts,
        "drift_detected": summary["drift_detected"],
        "drifted_features": summary["drifted_features"],
        "max_psi": summary["max_psi"],
        "prediction_psi": summary["prediction_psi"],
    }


def _measure(kind: str, rows: int, endpoint: str, fmt: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "plugins")])}
    command = [sys.executable, "-m", "bench.drift", "--worker", kind, "--rows", str(rows), "--endpoint", endpoint]
    command += ["--format", fmt]
    done = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(args: argparse.Namespace, endpoint: str) -> int:
    print(f"prediction log as {args.format}; load average before: {load_average()}", flush=True)
    results = []
    for rows in args.rows:
        publish = _publish(endpoint, rows, args.format)
        print(f"{rows:>11,} rows published in {publish:.1f}s", flush=True)
        project = _measure("project", rows, endpoint, args.format)
        print(f"{'':>11} project  {project['seconds']:6.1f}s {project['peak_mb']:7.0f} MB", flush=True)
        baseline = None
        if args.skip_baseline_above is None or rows <= args.skip_baseline_above:
            baseline = _measure("baseline", rows, endpoint, args.format)
            print(f"{'':>11} baseline {baseline['seconds']:6.1f}s {baseline['peak_mb']:7.0f} MB", flush=True)
        results.append((rows, project, baseline))
    _report(results)
    print(f"load average after: {load_average()}")
    largest = max(results, key=lambda r: r[0])
    met = largest[1]["seconds"] <= TARGET_SECONDS and largest[1]["peak_mb"] <= TARGET_MB
    agree = all(b is None or _decision(p) == _decision(b) for _, p, b in results)
    return 0 if met and agree else 1


def _decision(result: dict[str, Any]) -> tuple[bool, list[str]]:
    return result["drift_detected"], result["drifted_features"]


def _report(results: list[tuple[int, dict, dict | None]]) -> None:
    headers = ["rows", "step", "evaluated", "wall s", "peak MB", "max PSI", "pred PSI", "drifted", "same decision"]
    lines = []
    for rows, project, baseline in results:
        for name, result in (("baseline: Evidently, full data", baseline), ("project: drift step", project)):
            if result is None:
                lines.append([f"{rows:,}", name, "-", "skipped", "-", "-", "-", "-", "-"])
                continue
            same = (
                "-"
                if baseline is None or result is baseline
                else ("yes" if _decision(project) == _decision(baseline) else "NO")
            )
            lines.append(
                [
                    f"{rows:,}",
                    name,
                    f"{result['rows']['evaluated']:,}",
                    f"{result['seconds']:.1f}",
                    f"{result['peak_mb']:.0f}",
                    f"{result['max_psi']:.3f}",
                    f"{result['prediction_psi']:.3f}",
                    f"{len(result['drifted_features'])}/30",
                    same,
                ]
            )
    print()
    print(table(headers, lines))
    rows, project, _ = max(results, key=lambda r: r[0])
    verdict = "met" if project["seconds"] <= TARGET_SECONDS and project["peak_mb"] <= TARGET_MB else "MISSED"
    print(
        f"\ntarget at {rows:,} rows: <= {TARGET_SECONDS:.0f} s and <= {TARGET_MB:.0f} MB peak -> "
        f"{project['seconds']:.1f} s, {project['peak_mb']:.0f} MB: {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
