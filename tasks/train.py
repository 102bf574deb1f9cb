"""Training: candidates compared by cross-validation, the best logged to MLflow as one model.

Three steps, so that the DAG can run the candidates as mapped tasks side by side:
``start_training_run`` opens the parent MLflow run (lineage, spec, params), then
``cross_validate_candidate`` once per candidate (each its own nested run), then
``register_best`` picks the best by CV, refits it on the whole train split, logs and
registers it. ``train_and_register`` calls the three in sequence (one process).
Above ``cv_max_rows`` train rows the CV runs on a stratified subsample of that size:
the candidates' ranking is settled long before 800k rows, while the refit of the
selected one still sees the whole train split.

The registered model is the whole pipeline (the preprocessor fitted by the transform
step + the estimator), saved with skops, so serving takes raw spec columns and cannot
skew from training. Every candidate is a nested MLflow run under the DAG run's
parent run, which also records the data lineage (snapshot URIs and hashes, GX result),
the dataset spec, the git SHA, the Airflow identifiers and the reference statistics the
drift DAG compares live traffic against.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tasks.dataset_spec import CATEGORICAL, PROJECT_ROOT, DatasetSpec
from tasks.evaluate import finite_metrics as _finite
from tasks.evaluate import positive_scores
from tasks.gate import GateRule
from tasks.model_io import SKOPS_TRUSTED_TYPES
from tasks.tracking import CHALLENGER, check_tracking_server

log = logging.getLogger(__name__)

TRAINING_CONFIG = PROJECT_ROOT / "include" / "training.yaml"
CV_METRICS = ("roc_auc", "pr_auc", "f1", "precision", "recall", "accuracy")
SCORE_BINS = 10
# BLAS runs single-threaded during training (see tasks/__init__.py: the environment default
# covers processes that import tasks first, this limit the others).
TRAINING_BLAS_THREADS = 1


@dataclass(frozen=True)
class TrainingConfig:
    cv_folds: int = 5
    seed: int = 42
    selection_metric: str = "roc_auc"
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: GateRule = field(default_factory=GateRule)
    cv_max_rows: int | None = None  # CV on a stratified subsample of this many train rows (None: all)


def load_training_config(path: Path = TRAINING_CONFIG) -> TrainingConfig:
    """Read ``include/training.yaml``; unknown estimators or metrics fail with a clear message."""
    raw = yaml.safe_load(path.read_text()) or {}
    candidates = raw.get("candidates") or {}
    unknown = sorted(set(candidates) - set(ESTIMATORS))
    if unknown or not candidates:
        raise ValueError(f"{path}: candidates must be among {sorted(ESTIMATORS)}; got {sorted(candidates)}")
    config = TrainingConfig(
        cv_folds=int(raw.get("cv_folds", 5)),
        seed=int(raw.get("seed", 42)),
        selection_metric=raw.get("selection_metric", "roc_auc"),
        candidates={name: dict(params or {}) for name, params in candidates.items()},
        gate=GateRule(**(raw.get("gate") or {})),
        cv_max_rows=None if raw.get("cv_max_rows") is None else int(raw["cv_max_rows"]),
    )
    if config.selection_metric not in CV_METRICS:
        raise ValueError(f"{path}: selection_metric must be one of {CV_METRICS}")
    if config.cv_folds < 2:
        raise ValueError(f"{path}: cv_folds must be at least 2, got {config.cv_folds}")
    if config.cv_max_rows is not None and config.cv_max_rows < 10 * config.cv_folds:
        raise ValueError(f"{path}: cv_max_rows must be at least 10 x cv_folds, got {config.cv_max_rows}")
    return config


def _logistic_regression(params: dict, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(random_state=seed, **params)


def _random_forest(params: dict, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(random_state=seed, **params)


def _gradient_boosting(params: dict, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(random_state=seed, **params)


# Only these estimator families are allowed: their skops types are in SKOPS_TRUSTED_TYPES.
ESTIMATORS = {
    "logistic_regression": _logistic_regression,
    "random_forest": _random_forest,
    "gradient_boosting": _gradient_boosting,
}


def scorers(positive_class: Any) -> dict[str, Any]:
    """CV scorers with the dataset's positive class (which may be -1, not 1)."""
    from sklearn.metrics import average_precision_score, f1_score, make_scorer, precision_score, recall_score

    return {
        "roc_auc": "roc_auc",  # symmetric in the classes: no pos_label needed
        "pr_auc": make_scorer(average_precision_score, response_method="predict_proba", pos_label=positive_class),
        "f1": make_scorer(f1_score, pos_label=positive_class),
        "precision": make_scorer(precision_score, pos_label=positive_class, zero_division=0),
        "recall": make_scorer(recall_score, pos_label=positive_class),
        "accuracy": "accuracy",
    }


@dataclass
class CandidateResult:
    name: str
    params: dict[str, Any]
    cv_metrics: dict[str, float]
    cv_rows: int = 0
    seconds: float = 0.0
    run_id: str | None = None  # its nested MLflow run, once logged

    def as_xcom(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_xcom(cls, value: Mapping[str, Any]) -> CandidateResult:
        return cls(**dict(value))


def cv_sample(train: pd.DataFrame, spec: DatasetSpec, max_rows: int | None, seed: int) -> pd.DataFrame:
    """The rows the candidates are cross-validated on: all of ``train`` up to ``max_rows``,
    else a stratified (on the label) random subsample of ``max_rows`` rows, the same for a seed."""
    if max_rows is None or len(train) <= max_rows:
        return train
    from sklearn.model_selection import train_test_split

    sample, _ = train_test_split(train, train_size=max_rows, random_state=seed, stratify=train[spec.target.name])
    return sample.reset_index(drop=True)


def cross_validate_candidate(
    preprocessor: Any, cv_frame: pd.DataFrame, spec: DatasetSpec, config: TrainingConfig, name: str
) -> CandidateResult:
    """One candidate's CV scores (preprocessing refitted inside each fold); the folds depend
    on the rows and the seed only, so every candidate sees the same folds.

    Raises:
        ValueError: ``name`` is not a candidate of ``config``.
    """
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import Pipeline

    if name not in config.candidates:
        raise ValueError(f"{name!r} is not a candidate of the training config; candidates: {sorted(config.candidates)}")
    params = config.candidates[name]
    started = time.perf_counter()
    folds = StratifiedKFold(n_splits=config.cv_folds, shuffle=True, random_state=config.seed)
    pipeline = Pipeline([("preprocess", clone(preprocessor)), ("model", ESTIMATORS[name](params, config.seed))])
    with _thread_pools():
        scores = cross_validate(
            pipeline,
            cv_frame[spec.feature_names],
            cv_frame[spec.target.name],
            cv=folds,
            scoring=scorers(spec.positive_class),
        )
    cv_metrics = {}
    for metric in CV_METRICS:
        values = scores[f"test_{metric}"]
        cv_metrics[f"cv_{metric}_mean"] = float(np.mean(values))
        cv_metrics[f"cv_{metric}_std"] = float(np.std(values))
    seconds = time.perf_counter() - started
    log.info(
        "candidate %s: cv %s %.4f on %d rows in %.1fs",
        name,
        config.selection_metric,
        cv_metrics[f"cv_{config.selection_metric}_mean"],
        len(cv_frame),
        seconds,
    )
    return CandidateResult(name, dict(params), cv_metrics, cv_rows=len(cv_frame), seconds=seconds)


def cross_validate_candidates(
    preprocessor: Any, train: pd.DataFrame, spec: DatasetSpec, config: TrainingConfig
) -> list[CandidateResult]:
    """Score every candidate, in the config's order, on the same rows and folds."""
    cv_frame = cv_sample(train, spec, config.cv_max_rows, config.seed)
    return [cross_validate_candidate(preprocessor, cv_frame, spec, config, name) for name in config.candidates]


@contextlib.contextmanager
def _thread_pools() -> Iterator[None]:
    """One BLAS thread, and joblib on threads: the forest's ``n_jobs`` then uses the cores in a
    Celery task process too. A Celery worker forks daemonic processes, where joblib's default
    (loky) backend refuses to start and runs the forest's ``predict_proba`` (the CV scoring) on
    one thread ("Loky-backed parallel loops cannot be called in a multiprocessing, setting
    n_jobs=1"); the forest only needs threads (tests/tasks/test_train.py)."""
    # threadpoolctl limits the libraries loaded when it is entered: scipy's OpenBLAS
    # (lbfgs) loads with scipy.optimize, so that comes first.
    import joblib
    import scipy.optimize  # noqa: F401
    import scipy.special  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=TRAINING_BLAS_THREADS, user_api="blas"), joblib.parallel_config(backend="threading"):
        yield


def best_candidate(results: list[CandidateResult], metric: str) -> CandidateResult:
    """Highest mean CV score; ties go to the earlier (simpler, as listed) candidate."""
    if not results:
        raise ValueError("no candidate results to choose from")
    return max(results, key=lambda r: (r.cv_metrics[f"cv_{metric}_mean"], -results.index(r)))


def check_results(results: list[CandidateResult], config: TrainingConfig) -> None:
    """Every candidate of the config scored exactly once, by its name (what the select step is given).

    Raises:
        ValueError: Naming the missing or unexpected candidates.
    """
    names = [r.name for r in results]
    if sorted(names) != sorted(config.candidates):
        raise ValueError(
            f"candidate results {sorted(names)} do not match the training config's candidates "
            f"{sorted(config.candidates)}: rerun the candidate tasks of this run"
        )


def fit_final_pipeline(
    preprocessor: Any, train: pd.DataFrame, spec: DatasetSpec, candidate: CandidateResult, seed: int
) -> Any:
    """Preprocessor as fitted on train by the transform step + the estimator fitted on its output."""
    from sklearn.pipeline import Pipeline

    estimator = ESTIMATORS[candidate.name](candidate.params, seed)
    with _thread_pools():
        estimator.fit(preprocessor.transform(train[spec.feature_names]), train[spec.target.name])
    return Pipeline([("preprocess", preprocessor), ("model", estimator)])


def reference_statistics(train: pd.DataFrame, spec: DatasetSpec, scores: np.ndarray) -> dict[str, Any]:
    """Distributions the drift DAG compares live traffic with (PSI needs the same bins)."""
    features = {}
    for column in spec.features:
        values = train[column.name]
        if column.kind == CATEGORICAL:
            shares = values.value_counts(normalize=True)
            features[column.name] = {
                "kind": CATEGORICAL,
                "values": list(column.allowed_values),
                "shares": [float(shares.get(v, 0.0)) for v in column.allowed_values],
            }
        else:
            edges = np.unique(np.quantile(values.dropna(), np.linspace(0, 1, SCORE_BINS + 1)))
            counts, _ = np.histogram(values.dropna(), bins=edges)
            features[column.name] = {
                "kind": "numeric",
                "bin_edges": edges.tolist(),
                "shares": (counts / max(counts.sum(), 1)).tolist(),
            }
    score_edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    score_counts, _ = np.histogram(scores, bins=score_edges)
    return {
        "rows": len(train),
        "positive_share": float((train[spec.target.name] == spec.positive_class).mean()),
        "features": features,
        "prediction": {"bin_edges": score_edges.tolist(), "shares": (score_counts / max(len(scores), 1)).tolist()},
    }


def git_sha() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def serving_requirements() -> list[str]:
    """Exact pins of what loading the model needs; MLflow's own inference spends ~10 s per model."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "scikit-learn", "skops", "pandas", "numpy", "scipy")]


def candidate_assignments(training_run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One item per candidate: its name and the parent run to log under (what the DAG maps over)."""
    parent = {k: v for k, v in training_run.items() if k != "candidates"}
    return [{**parent, "candidate": name} for name in training_run["candidates"]]


def parent_run(assignments: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The parent run the assignments share (the inverse of ``candidate_assignments``).

    Raises:
        ValueError: No assignment, or assignments of different parent runs.
    """
    runs = {a["run_id"] for a in assignments}
    if len(runs) != 1:
        raise ValueError(f"candidate assignments must share one parent run, got {sorted(runs) or 'none'}")
    first = dict(assignments[0])
    first.pop("candidate")
    return {**first, "candidates": [a["candidate"] for a in assignments]}


def _mlflow(tracking_uri: str, experiment: str) -> Any:
    import mlflow

    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    return mlflow


def start_training_run(
    *,
    train: pd.DataFrame,
    spec: DatasetSpec,
    config: TrainingConfig,
    tracking_uri: str,
    experiment: str,
    lineage: dict[str, Any],
    tags: dict[str, str],
) -> dict[str, Any]:
    """Open the parent MLflow run: params, the training input, lineage and spec.

    The run is left RUNNING: the candidates log their nested runs under it and
    ``register_best`` finishes it.

    Returns:
        Its run and experiment ids, the git SHA and the candidates' names (config order).

    Raises:
        TrackingUnavailable: The tracking server is down (the Airflow task retries).
    """
    mlflow = _mlflow(tracking_uri, experiment)
    sha = git_sha()
    parent = mlflow.start_run(run_name=f"train {lineage['ds']}", tags={**tags, "git_sha": sha})
    try:
        mlflow.log_params(
            {
                "dataset": spec.name,
                "ds": lineage["ds"],
                "window_days": lineage.get("window_days", 1),
                "cv_folds": config.cv_folds,
                "cv_max_rows": config.cv_max_rows,
                "seed": config.seed,
                "selection_metric": config.selection_metric,
                "train_rows": len(train),
            }
        )
        mlflow.log_input(
            mlflow.data.from_pandas(
                train,
                source=lineage["snapshot_uris"][-1],
                targets=spec.target.name,
                name=f"{spec.name}-train",
                digest=lineage["content_hashes"][-1][:16],
            ),
            context="training",
        )
        mlflow.log_dict(lineage, "lineage.json")
        mlflow.log_dict(spec.to_dict(), "dataset_spec.json")
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="RUNNING")  # detach; register_best resumes and finishes it
    return {
        "run_id": parent.info.run_id,
        "experiment_id": parent.info.experiment_id,
        "git_sha": sha,
        "candidates": list(config.candidates),
    }


def log_candidate(
    *,
    preprocessor: Any,
    train: pd.DataFrame,
    spec: DatasetSpec,
    config: TrainingConfig,
    name: str,
    tracking_uri: str,
    experiment: str,
    parent_run_id: str,
) -> CandidateResult:
    """Cross-validate one candidate (on the CV sample of ``train``) in its own nested run.

    A retry reuses a finished nested run of the same candidate under the same parent
    (same rows, folds and seed give the same scores) instead of logging a second one.
    """
    mlflow = _mlflow(tracking_uri, experiment)
    from mlflow import MlflowClient

    experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    done = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.candidate = '{name}' and attributes.status = 'FINISHED'"
        ),
        max_results=1,
    )
    if done:
        previous = done[0]
        log.info("candidate %s already scored in run %s: reusing it", name, previous.info.run_id)
        cv_metrics = {k: v for k, v in previous.data.metrics.items() if k.startswith("cv_")}
        return CandidateResult(
            name,
            dict(config.candidates[name]),
            cv_metrics,
            cv_rows=int(float(previous.data.params.get("cv_rows", 0))),
            run_id=previous.info.run_id,
        )
    cv_frame = cv_sample(train, spec, config.cv_max_rows, config.seed)
    with mlflow.start_run(
        run_name=name, parent_run_id=parent_run_id, experiment_id=experiment_id, tags={"candidate": name}
    ) as child:
        result = cross_validate_candidate(preprocessor, cv_frame, spec, config, name)
        mlflow.log_params({"estimator": name, "cv_rows": result.cv_rows, **result.params})
        mlflow.log_metrics({**_finite(result.cv_metrics), "cv_seconds": result.seconds})
        result.run_id = child.info.run_id
    return result


def register_best(
    *,
    train: pd.DataFrame,
    preprocessor: Any,
    spec: DatasetSpec,
    config: TrainingConfig,
    results: list[CandidateResult],
    training_run: Mapping[str, Any],
    tracking_uri: str,
    experiment: str,
    model_name: str,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """Pick the best candidate by CV, refit it on the whole train split, log it in the parent
    run and register it as ``challenger``; the parent run is finished here.

    Raises:
        ValueError: ``results`` do not cover the config's candidates exactly.
        TrackingUnavailable: The tracking server is down (the Airflow task retries).
    """
    mlflow = _mlflow(tracking_uri, experiment)
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    check_results(results, config)
    features = train[spec.feature_names]
    with mlflow.start_run(run_id=training_run["run_id"]) as parent:
        best = best_candidate(results, config.selection_metric)
        log.info("refitting %s on the whole train split (%d rows)", best.name, len(train))
        started = time.perf_counter()
        pipeline = fit_final_pipeline(preprocessor, train, spec, best, config.seed)
        refit_seconds = time.perf_counter() - started
        scores = positive_scores(pipeline, features, spec.positive_class)
        mlflow.log_dict(reference_statistics(train, spec, scores), "reference_stats.json")
        mlflow.log_params({"best_estimator": best.name, **{f"best.{k}": v for k, v in best.params.items()}})
        mlflow.log_metrics({**_finite(best.cv_metrics), "refit_seconds": refit_seconds})
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            serialization_format="skops",
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
            signature=infer_signature(features.head(50), pipeline.predict(features.head(50))),
            input_example=features.head(3),
            pip_requirements=serving_requirements(),
            registered_model_name=model_name,
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        client.set_model_version_tag(model_name, version, "ds", lineage["ds"])
        client.set_model_version_tag(model_name, version, "content_sha256", lineage["content_hashes"][-1])
        log.info("registered %s version %s (%s) as %s", model_name, version, best.name, CHALLENGER)
        return {
            "run_id": parent.info.run_id,
            "experiment_id": parent.info.experiment_id,
            "model_name": model_name,
            "model_version": version,
            "model_uri": f"models:/{model_name}/{version}",
            "best_estimator": best.name,
            "params": best.params,
            "cv_metrics": best.cv_metrics,
            "git_sha": training_run["git_sha"],
        }


def train_and_register(
    *,
    train: pd.DataFrame,
    preprocessor: Any,
    spec: DatasetSpec,
    config: TrainingConfig,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    lineage: dict[str, Any],
    tags: dict[str, str],
) -> dict[str, Any]:
    """Cross-validate the candidates, log everything to MLflow, register the best as ``challenger``
    (the three steps the DAG runs as tasks, in sequence in this process).

    Args:
        train: The train split (raw spec columns).
        preprocessor: The ColumnTransformer fitted on ``train`` by the transform step.
        spec: Dataset spec.
        config: Candidates, folds, seed, selection metric, CV row cap.
        tracking_uri: MLflow tracking server.
        experiment: MLflow experiment name.
        model_name: Registered model name.
        lineage: snapshot_uris, content_hashes, validation_uris, ds, window_days, features_uri.
        tags: Airflow identifiers and the trigger (dag_id, run_id, ds, trigger_reason, ...).

    Returns:
        Parent run id, registered version, best candidate and its CV metrics.

    Raises:
        TrackingUnavailable: The tracking server is down (the Airflow task retries).
    """
    training_run = start_training_run(
        train=train,
        spec=spec,
        config=config,
        tracking_uri=tracking_uri,
        experiment=experiment,
        lineage=lineage,
        tags=tags,
    )
    mlflow_at = {"tracking_uri": tracking_uri, "experiment": experiment}
    results = [
        log_candidate(
            preprocessor=preprocessor,
            train=train,
            spec=spec,
            config=config,
            name=name,
            parent_run_id=training_run["run_id"],
            **mlflow_at,
        )
        for name in training_run["candidates"]
    ]
    return register_best(
        train=train,
        preprocessor=preprocessor,
        spec=spec,
        config=config,
        results=results,
        training_run=training_run,
        model_name=model_name,
        lineage=lineage,
        **mlflow_at,
    )
