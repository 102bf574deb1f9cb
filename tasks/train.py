"""Training: candidates compared by cross-validation, the best logged to MLflow as one model.

The registered model is the whole pipeline (the preprocessor fitted by the transform
step + the estimator), saved with skops, so serving takes raw spec columns and cannot
skew from training. Every candidate is a nested MLflow run under the DAG run's
parent run, which also records the data lineage (snapshot URIs and hashes, GX result),
the dataset spec, the git SHA, the Airflow identifiers and the reference statistics the
drift DAG compares live traffic against.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class TrainingConfig:
    cv_folds: int = 5
    seed: int = 42
    selection_metric: str = "roc_auc"
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: GateRule = field(default_factory=GateRule)


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
    )
    if config.selection_metric not in CV_METRICS:
        raise ValueError(f"{path}: selection_metric must be one of {CV_METRICS}")
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


def cross_validate_candidates(
    preprocessor: Any, train: pd.DataFrame, spec: DatasetSpec, config: TrainingConfig
) -> list[CandidateResult]:
    """Score every candidate (preprocessing refitted inside each fold) with the same folds."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import Pipeline

    features, target = train[spec.feature_names], train[spec.target.name]
    folds = StratifiedKFold(n_splits=config.cv_folds, shuffle=True, random_state=config.seed)
    results = []
    for name, params in config.candidates.items():
        pipeline = Pipeline([("preprocess", clone(preprocessor)), ("model", ESTIMATORS[name](params, config.seed))])
        scores = cross_validate(pipeline, features, target, cv=folds, scoring=scorers(spec.positive_class))
        cv_metrics = {}
        for metric in CV_METRICS:
            values = scores[f"test_{metric}"]
            cv_metrics[f"cv_{metric}_mean"] = float(np.mean(values))
            cv_metrics[f"cv_{metric}_std"] = float(np.std(values))
        results.append(CandidateResult(name, params, cv_metrics))
        log.info(
            "candidate %s: cv %s %.4f", name, config.selection_metric, cv_metrics[f"cv_{config.selection_metric}_mean"]
        )
    return results


def best_candidate(results: list[CandidateResult], metric: str) -> CandidateResult:
    """Highest mean CV score; ties go to the earlier (simpler, as listed) candidate."""
    return max(results, key=lambda r: (r.cv_metrics[f"cv_{metric}_mean"], -results.index(r)))


def fit_final_pipeline(
    preprocessor: Any, train: pd.DataFrame, spec: DatasetSpec, candidate: CandidateResult, seed: int
) -> Any:
    """Preprocessor as fitted on train by the transform step + the estimator fitted on its output."""
    from sklearn.pipeline import Pipeline

    estimator = ESTIMATORS[candidate.name](candidate.params, seed)
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
    """Cross-validate the candidates, log everything to MLflow, register the best as ``challenger``.

    Args:
        train: The train split (raw spec columns).
        preprocessor: The ColumnTransformer fitted on ``train`` by the transform step.
        spec: Dataset spec.
        config: Candidates, folds, seed, selection metric.
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
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    features = train[spec.feature_names]
    sha = git_sha()
    with mlflow.start_run(run_name=f"train {lineage['ds']}", tags={**tags, "git_sha": sha}) as parent:
        mlflow.log_params(
            {
                "dataset": spec.name,
                "ds": lineage["ds"],
                "window_days": lineage.get("window_days", 1),
                "cv_folds": config.cv_folds,
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
        results = cross_validate_candidates(preprocessor, train, spec, config)
        for result in results:
            with mlflow.start_run(run_name=result.name, nested=True):
                mlflow.set_tag("candidate", result.name)
                mlflow.log_params({"estimator": result.name, **result.params})
                mlflow.log_metrics(_finite(result.cv_metrics))
        best = best_candidate(results, config.selection_metric)
        pipeline = fit_final_pipeline(preprocessor, train, spec, best, config.seed)
        scores = positive_scores(pipeline, features, spec.positive_class)
        mlflow.log_dict(reference_statistics(train, spec, scores), "reference_stats.json")
        mlflow.log_params({"best_estimator": best.name, **{f"best.{k}": v for k, v in best.params.items()}})
        mlflow.log_metrics(_finite(best.cv_metrics))
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
            "git_sha": sha,
        }
