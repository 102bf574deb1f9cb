"""Training benchmark: the train step as the DAG runs it, against a bare scikit-learn fit, at 100k and 1M rows.

For each size, a day of ``--rows`` generated rows is published as 4 CSV files (as
``make publish-drop ... --rows N --parts 4`` does) to a private stack (moto + MLflow on
free loopback ports, state in a temporary folder), then ingested and split by the project's
``tasks/`` functions (not timed). Then, each in a fresh process so its peak memory is its own:

* **project**: the train step with ``include/training.yaml``: the train split and the
  preprocessor read from S3, then ``tasks.train.train_and_register``, the three functions
  the DAG's ``start_training`` → ``train_candidate`` (mapped) → ``train`` tasks call, in
  sequence: CV of every candidate in its nested MLflow run, refit of the best on the whole
  train split, reference statistics, the skops model logged and registered as challenger;
* **today**: the same with the configuration before this benchmark existed
  (``bench/training_today.yaml``: 5-fold CV on all train rows, the forest without
  ``max_samples``, ``n_jobs: 2``); ``--today-rows`` says at which sizes (it is the slow one);
* **floor**: the bare call: ``preprocessor.transform`` and ``fit`` of the estimator the
  project run selected, with its parameters, on the same train split.

Wall time starts once the inputs are read (the read is its own column) and ends when the
model is registered (project, today) or fitted (floor); peak memory is the process's
maximum RSS at that moment. The holdout ROC AUC is the registered model's (loaded back from
the registry) on the test split. Targets at 1M rows: project < 120 s and < 4 GB, holdout
ROC AUC within 0.002 of today's.

Usage::

    python -m bench.train                                    # 100k and 1M, today's config at both
    python -m bench.train --rows 100000 --today-rows         # quick: no run of today's config
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, load_average, table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TODAY_CONFIG = PROJECT_ROOT / "bench" / "training_today.yaml"
DATASET = "network_security"
DS = "2026-03-02"
PARTS = 4
TARGET_SECONDS, TARGET_MB, TARGET_AUC_DELTA = 120.0, 4096.0, 0.002


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _exit_on_sigterm()
    if args.worker:
        print("RESULT " + json.dumps(_work(args)), flush=True)
        return 0
    with PrivateStack() as env:
        rows_results = []
        for rows in args.rows:
            ds = _day(rows)
            print(f"publishing and splitting {rows:,} rows ...", flush=True)
            features = prepare_day(env, rows, ds)
            runs = {"project": _measure(env, "project", rows, ds, features)}
            if rows in args.today_rows:
                runs["today"] = _measure(env, "today", rows, ds, features)
            runs["floor"] = _measure(env, "floor", rows, ds, features, estimator=runs["project"]["best_estimator"])
            rows_results.append((rows, features, runs))
        _report(rows_results)
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM (a timeout, a Ctrl-C'd make) unwinds like an error: the private stack is stopped."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--today-rows", type=int, nargs="*", default=None, help="sizes at which today's config runs too (default all)"
    )
    parser.add_argument("--worker", choices=["project", "today", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--ds", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--estimator", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.today_rows is None:
        args.today_rows = list(args.rows)
    return args


def _day(rows: int) -> str:
    """One day per size, so the sizes never share a snapshot."""
    import datetime as dt

    return (dt.date.fromisoformat(DS) + dt.timedelta(days=len(str(rows)))).isoformat()


class PrivateStack:
    """moto + MLflow on free loopback ports, state in a temporary folder (deleted on exit)."""

    def __init__(self, airflow: bool = False) -> None:
        self.airflow = airflow

    def __enter__(self) -> dict[str, str]:
        from scripts import bootstrap, services, stack

        self.folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
        self.paths = services.Paths(self.folder)
        self.ports = services.Ports(moto=free_port(), mlflow=free_port(), airflow=free_port(), serving=free_port())
        try:
            self.env = {**os.environ, **(bootstrap.up if self.airflow else stack.up)(self.paths, self.ports)}
            if not self.airflow:
                bootstrap.create_buckets(self.env)
        except BaseException:
            self.__exit__()
            raise
        self.env["NS_RETRY_DELAY_SECONDS"] = "1"
        return self.env

    def __exit__(self, *exc: object) -> None:
        from scripts import stack

        stack.down(self.paths, self.ports)
        shutil.rmtree(self.folder, ignore_errors=True)


def run_plan(env: dict[str, str], ds: str) -> Any:
    """The training run plan of ``ds`` on the private stack (what ``plan_run`` gives the DAG)."""
    from scripts.bootstrap import configured_settings
    from tasks.dataset_spec import available_datasets
    from tasks.plan import plan_run

    return plan_run(configured_settings(env), {}, ds, "manual", available_datasets())


def publish(env: dict[str, str], rows: int, ds: str) -> None:
    """The day's drop as ``make publish-drop DS=ds ARGS="--rows N --parts 4"`` writes it."""
    from scripts.services import s3_client
    from tasks.datagen import publish_drop

    publish_drop(s3_client(env), run_plan(env, ds).layout, rows, parts=PARTS)


def prepare_day(env: dict[str, str], rows: int, ds: str) -> dict[str, Any]:
    """Publish, ingest and transform the day with the project's functions; the transform's output."""
    from scripts.services import s3_client
    from tasks import pipeline

    publish(env, rows, ds)
    plan, s3 = run_plan(env, ds), s3_client(env)
    pipeline.ingest(plan, s3)
    return pipeline.transform(plan, s3)


def _measure(env: dict[str, str], kind: str, rows: int, ds: str, features: dict, estimator: str = "") -> dict:
    print(f"  {kind} at {rows:,} rows (load {load_average()}) ...", flush=True)
    command = [sys.executable, "-m", "bench.train", "--worker", kind, "--ds", ds, "--features", json.dumps(features)]
    if estimator:
        command += ["--estimator", estimator]
    done = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench.train {kind} at {rows} rows failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["load"] = load_average()
    print(
        f"    {result['seconds']:.1f} s, {result['peak_mb']:,.0f} MB, holdout ROC AUC {result['auc']:.5f}", flush=True
    )
    return result


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _work(args: argparse.Namespace) -> dict[str, Any]:
    from scripts.services import s3_client
    from tasks import storage
    from tasks.train import ESTIMATORS, load_training_config, train_and_register
    from tasks.transform import read_preprocessor

    env = dict(os.environ)
    features = json.loads(args.features)
    plan, s3 = run_plan(env, args.ds), s3_client(env)
    spec, settings = plan.spec, plan.settings
    started = time.perf_counter()
    train = storage.read_parquet(s3, storage.parse_s3_uri(features["train_uri"]))
    preprocessor = read_preprocessor(s3, features["preprocessor_uri"])
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if args.worker == "floor":
        config = load_training_config()
        estimator = ESTIMATORS[args.estimator](config.candidates[args.estimator], config.seed)
        estimator.fit(preprocessor.transform(train[spec.feature_names]), train[spec.target.name])
        seconds, peak = time.perf_counter() - started, _peak_mb()
        from sklearn.pipeline import Pipeline

        model, best, cv_auc = Pipeline([("preprocess", preprocessor), ("model", estimator)]), args.estimator, None
    else:
        config = load_training_config(TODAY_CONFIG) if args.worker == "today" else load_training_config()
        trained = train_and_register(
            train=train,
            preprocessor=preprocessor,
            spec=spec,
            config=config,
            tracking_uri=settings.mlflow_tracking_uri,
            experiment=f"bench_train_{args.worker}",
            model_name=f"bench_{args.worker}",
            lineage=plan.training_lineage(features, "s3://bench/no-validation"),
            tags=plan.training_tags("bench_train", f"{args.worker}__{args.ds}"),
        )
        seconds, peak = time.perf_counter() - started, _peak_mb()
        import mlflow.sklearn

        mlflow.set_registry_uri(settings.mlflow_tracking_uri)
        model = mlflow.sklearn.load_model(trained["model_uri"])
        best, cv_auc = trained["best_estimator"], trained["cv_metrics"]["cv_roc_auc_mean"]
    from sklearn.metrics import roc_auc_score

    from tasks.evaluate import positive_scores

    test = storage.read_parquet(s3, storage.parse_s3_uri(features["test_uri"]))
    truth = test[spec.target.name] == spec.positive_class
    auc = float(roc_auc_score(truth, positive_scores(model, test[spec.feature_names], spec.positive_class)))
    return {
        "seconds": seconds,
        "read_seconds": read_seconds,
        "peak_mb": peak,
        "best_estimator": best,
        "cv_auc": cv_auc,
        "auc": auc,
        "train_rows": len(train),
        "cv_rows": min(len(train), config.cv_max_rows or len(train)),
        "cv_folds": config.cv_folds,
    }


def _report(results: list[tuple[int, dict, dict]]) -> None:
    rows_out = []
    for rows, _, runs in results:
        floor = runs["floor"]["seconds"]
        for kind in ("project", "today", "floor"):
            if kind not in runs:
                continue
            run = runs[kind]
            rows_out.append(
                [
                    f"{rows:,}",
                    kind,
                    run["best_estimator"],
                    f"{run['cv_folds']}x{run['cv_rows']:,}" if kind != "floor" else "-",
                    run["read_seconds"],
                    run["seconds"],
                    run["seconds"] / floor,
                    run["peak_mb"],
                    f"{run['cv_auc']:.4f}" if run["cv_auc"] is not None else "-",
                    f"{run['auc']:.5f}",
                    run["load"],
                ]
            )
    print()
    print(
        table(
            [
                "rows",
                "run",
                "selected",
                "CV folds x rows",
                "read s",
                "train+register s",
                "x floor",
                "peak MB",
                "CV ROC AUC",
                "holdout ROC AUC",
                "load after",
            ],
            rows_out,
        )
    )
    print()
    verdicts = []
    for rows, _, runs in results:
        project = runs["project"]
        line = (
            f"{rows:,} rows: train+register {project['seconds']:.1f} s (target < {TARGET_SECONDS:.0f} s), "
            f"peak {project['peak_mb']:,.0f} MB (target < {TARGET_MB:,.0f} MB)"
        )
        if "today" in runs:
            delta = project["auc"] - runs["today"]["auc"]
            line += (
                f", holdout ROC AUC {project['auc']:.5f} vs today's {runs['today']['auc']:.5f} "
                f"({delta:+.5f}; target >= -{TARGET_AUC_DELTA}), {runs['today']['seconds'] / project['seconds']:.1f}x faster than today"
            )
        verdicts.append(line)
    print("\n".join(verdicts))
    print(f"load average at the end: {load_average()} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    sys.exit(main())
