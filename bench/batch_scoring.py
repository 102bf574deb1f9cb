"""Batch-scoring benchmark: a day's backlog of 1M rows x 30 features, batch scoring against a bare ``predict_proba``.

The backlog (1M generated rows in 4 parquet files, or CSV with ``--format csv``) is written
to an S3 emulator (``moto_server`` on loopback, its own process), and a model is trained
once (the training config's random forest, or a logistic regression) and saved with skops.
Then, each in a fresh process so its peak memory is its own:

* **baseline**: the bare call: the same parquet files downloaded and read whole with pandas,
  ``pipeline.predict_proba`` on all rows at once;
* **project**: ``tasks.batch_scoring.score_backlog``: the server's predictor built over the
  pipeline, the files streamed and scored in chunks of ``chunk_rows``, rows checked against
  the spec, the predictions parquet, the per-chunk prediction-log objects and the manifest
  written back to S3.

Both times start after the model is loaded (skops) and end when the probabilities exist
(baseline) or everything is written (project). With ``--check-rows N`` the first N rows of
the project's output are compared with the serving app's answers (``serving.app`` through
``TestClient``, ``POST /predict/batch`` in batches of 1000), labels and probabilities.
Targets: project <= 1.5x the baseline's wall time, peak memory <= 1.5 GB.

Usage::

    python -m bench.batch_scoring                               # 1M rows, forest and logistic, check 100k
    python -m bench.batch_scoring --rows 200000 --models forest --check-rows 0   # quicker
    python -m bench.batch_scoring --format csv                  # the backlog as CSV, the issue's format
"""

from __future__ import annotations

import argparse
import datetime as dt
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

from bench.common import LOOPBACK, ServerProcess, base_environment, free_port, load_average, table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RAW, LAKE = "bench-raw", "bench-lake"
DS = "2026-03-10"
SCORED_AT = dt.datetime(2026, 3, 11, tzinfo=dt.UTC)
PARTS = 4
TARGET_RATIO, TARGET_MB = 1.5, 1536.0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_work(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        port = free_port()
        endpoint = f"http://{LOOPBACK}:{port}"
        moto = ServerProcess(
            "moto_server",
            [str(Path(sys.executable).parent / "moto_server"), "-H", LOOPBACK, "-p", str(port)],
            base_environment(),
            f"{endpoint}/moto-api/data.json",
            Path(folder) / "moto.log",
        )
        with moto:
            return _compare(args, endpoint, Path(folder))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--models", nargs="+", choices=["forest", "logistic", "boosting"], default=["forest", "logistic"]
    )
    parser.add_argument(
        "--format", choices=["parquet", "csv"], default="parquet", help="backlog files (default parquet)"
    )
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: include/batch_scoring.yaml")
    parser.add_argument("--check-rows", type=int, default=100_000, help="rows compared with the serving app (0: none)")
    parser.add_argument("--worker", choices=["baseline", "project", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )


def _train(kind: str, path: Path) -> None:
    """The model the backlog is scored with, saved with skops as the registry stores it."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from tasks.datagen import generate
    from tasks.dataset_spec import load_spec
    from tasks.model_io import dump_skops
    from tasks.train import load_training_config
    from tasks.transform import build_preprocessor

    spec = load_spec("network_security")
    candidates = load_training_config().candidates
    estimator = {
        "forest": lambda: RandomForestClassifier(random_state=0, **candidates["random_forest"]),
        "logistic": lambda: LogisticRegression(random_state=0, **candidates["logistic_regression"]),
        "boosting": lambda: HistGradientBoostingClassifier(random_state=0, **candidates["gradient_boosting"]),
    }[kind]()
    train = generate(spec, 20_000, seed=1)
    pipeline = Pipeline([("preprocess", build_preprocessor(spec)), ("model", estimator)])
    pipeline.fit(train[spec.feature_names], train[spec.target.name])
    path.write_bytes(dump_skops(pipeline))


def _publish(endpoint: str, rows: int, fmt: str) -> float:
    """The day's backlog in PARTS files; returns seconds spent."""
    import numpy as np

    from tasks.datagen import generate
    from tasks.dataset_spec import load_spec

    started = time.perf_counter()
    spec = load_spec("network_security")
    client = _client(endpoint)
    for bucket in (RAW, LAKE):
        client.create_bucket(Bucket=bucket)
    prefix = f"{spec.raw_prefix}_backlog/ds={DS}/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=RAW, Prefix=prefix):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=RAW, Key=item["Key"])
    bounds = np.linspace(0, rows, PARTS + 1).astype(int)
    for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        frame = generate(spec, int(stop - start), seed=100 + part)[spec.feature_names]
        buffer = io.BytesIO()
        if fmt == "parquet":
            frame.to_parquet(buffer, index=False)
        else:
            frame.to_csv(buffer, index=False)
        client.put_object(Bucket=RAW, Key=f"{prefix}part-{part:04d}.{fmt}", Body=buffer.getvalue())
    return time.perf_counter() - started


def _work(args: argparse.Namespace) -> dict[str, Any]:
    """One measured run in this (fresh) process: seconds, peak RSS, and what came out."""
    import numpy as np
    import pandas as pd

    from tasks import batch_scoring, storage
    from tasks.dataset_spec import load_spec
    from tasks.model_io import load_skops

    spec = load_spec("network_security")
    client = _client(args.endpoint)
    pipeline = load_skops(Path(args.model_path).read_bytes())
    layout = batch_scoring.BatchLayout(RAW, LAKE, spec, DS, batch_scoring.load_batch_scoring_config())
    if args.chunk_rows:
        layout = batch_scoring.BatchLayout(RAW, LAKE, spec, DS, layout.config.replace(chunk_rows=args.chunk_rows))
    keys = batch_scoring.backlog_files(client, layout)
    if args.worker == "check":
        return _check(client, pipeline, spec, keys, args.check_rows)
    started = time.perf_counter()
    if args.worker == "baseline":
        frames = []
        for key in keys:
            body = io.BytesIO(storage.get_bytes(client, storage.S3Location(RAW, key)))
            frames.append(pd.read_parquet(body) if key.endswith(".parquet") else pd.read_csv(body))
        features = pd.concat(frames, ignore_index=True)[spec.feature_names]
        del frames
        positive = list(pipeline.classes_).index(spec.positive_class)
        probabilities = pipeline.predict_proba(features)[:, positive]
        rows, mean = len(probabilities), float(np.mean(probabilities))
        chunks, predictor = 1, "pipeline.predict_proba"
    else:
        model = batch_scoring.scoring_model(pipeline, spec, spec.name, "bench")
        manifest = batch_scoring.score_backlog(client, layout, model, scored_at=SCORED_AT)
        rows, chunks, predictor = manifest["rows_scored"], manifest["chunks"], manifest["predictor"]
        mean = float("nan")
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
        "chunks": chunks,
        "predictor": predictor,
        "mean_probability": mean,
    }


def _check(client: Any, pipeline: Any, spec: Any, keys: list[str], rows: int) -> dict[str, Any]:
    """The project's output against the serving app's answers for the first ``rows`` backlog rows."""
    import numpy as np
    import pandas as pd

    from tasks import batch_scoring, storage
    from tests.tasks.serving_app import serve_batches

    frames, held = [], 0
    for key in keys:
        if held >= rows:
            break
        body = io.BytesIO(storage.get_bytes(client, storage.S3Location(RAW, key)))
        frame = pd.read_parquet(body) if key.endswith(".parquet") else pd.read_csv(body)
        frames.append(frame[spec.feature_names])
        held += len(frame)
    backlog = pd.concat(frames, ignore_index=True).head(rows)
    manifest = storage.get_json(client, storage.S3Location(LAKE, f"batch_scores/{spec.name}/ds={DS}/manifest.json"))
    output = batch_scoring.read_scores(client, manifest, columns=["label", "probability"]).head(rows)
    started = time.perf_counter()
    served = serve_batches(pipeline, spec, backlog, version="bench")
    gap = np.abs(output["probability"].to_numpy() - served["probability"].to_numpy())
    return {
        "rows": len(served),
        "labels_equal": bool((output["label"].to_numpy() == served["label"].to_numpy()).all()),
        "max_probability_gap": float(gap.max()),
        "identical_probabilities": int((gap == 0).sum()),
        "serving_seconds": time.perf_counter() - started,
    }


def _measure(kind: str, args: argparse.Namespace, endpoint: str, model_path: Path) -> dict[str, Any]:
    env = {**base_environment(), "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "plugins")])}
    command = [sys.executable, "-m", "bench.batch_scoring", "--worker", kind, "--endpoint", endpoint]
    command += ["--model-path", str(model_path), "--check-rows", str(args.check_rows)]
    if args.chunk_rows:
        command += ["--chunk-rows", str(args.chunk_rows)]
    done = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(args: argparse.Namespace, endpoint: str, folder: Path) -> int:
    print(f"backlog of {args.rows:,} rows as {args.format}; load average before: {load_average()}", flush=True)
    print(f"  published in {_publish(endpoint, args.rows, args.format):.1f}s", flush=True)
    lines, met = [], True
    for kind in args.models:
        model_path = folder / f"{kind}.skops"
        _train(kind, model_path)
        baseline = _measure("baseline", args, endpoint, model_path)
        project = _measure("project", args, endpoint, model_path)
        check = _measure("check", args, endpoint, model_path) if args.check_rows else None
        ratio = project["seconds"] / baseline["seconds"]
        ok = ratio <= TARGET_RATIO and project["peak_mb"] <= TARGET_MB and (check is None or check["labels_equal"])
        met &= ok
        same = "-"
        if check is not None:
            same = (
                f"{check['rows']:,}: labels {'equal' if check['labels_equal'] else 'DIFFER'}, "
                f"max |dp| {check['max_probability_gap']:.1e}"
            )
        for name, result in (("baseline: bare predict_proba", baseline), ("project: batch scoring", project)):
            lines.append(
                [
                    kind,
                    name,
                    f"{result['rows']:,}",
                    result["chunks"],
                    f"{result['seconds']:.1f}",
                    f"{result['peak_mb']:.0f}",
                    f"{ratio:.2f}x" if result is project else "1.00x",
                    same if result is project else "-",
                ]
            )
        print(
            f"  {kind}: baseline {baseline['seconds']:.1f}s, project {project['seconds']:.1f}s ({project['predictor']})",
            flush=True,
        )
    print()
    headers = [
        "model",
        "step",
        "rows",
        "chunks",
        "wall s",
        "peak MB",
        "vs bare",
        "same as the serving app (rows checked)",
    ]
    print(table(headers, lines))
    print(f"\nload average after: {load_average()}")
    print(
        f"targets: project <= {TARGET_RATIO}x the bare call's wall time, peak <= {TARGET_MB:.0f} MB"
        + (", labels equal to the serving app's" if args.check_rows else "")
        + f": {'met' if met else 'MISSED'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
