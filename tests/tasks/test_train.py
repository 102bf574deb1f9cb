"""Training decisions: the CV sample, one candidate's scores, the choice, what the mapped tasks exchange."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.datagen import generate
from tasks.dataset_spec import DatasetSpec
from tasks.train import (
    CandidateResult,
    TrainingConfig,
    best_candidate,
    candidate_assignments,
    check_results,
    cross_validate_candidate,
    cross_validate_candidates,
    cv_sample,
    load_training_config,
    parent_run,
)
from tasks.transform import build_preprocessor

SMALL = TrainingConfig(
    cv_folds=3,
    seed=7,
    candidates={"logistic_regression": {"max_iter": 500}, "gradient_boosting": {"max_iter": 20}},
    cv_max_rows=600,
)


def result(name: str, auc: float) -> CandidateResult:
    return CandidateResult(name, {}, {"cv_roc_auc_mean": auc, "cv_roc_auc_std": 0.0})


def test_the_project_config_loads_and_caps_the_cv_rows() -> None:
    config = load_training_config()
    assert set(config.candidates) == {"logistic_regression", "random_forest", "gradient_boosting"}
    assert config.cv_max_rows is not None and config.cv_max_rows >= 10 * config.cv_folds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("candidates: {svm: {}}", "candidates must be among"),
        ("cv_folds: 1\ncandidates: {logistic_regression: {}}", "cv_folds must be at least 2"),
        ("cv_max_rows: 20\ncandidates: {logistic_regression: {}}", "cv_max_rows must be at least"),
        ("selection_metric: loss\ncandidates: {logistic_regression: {}}", "selection_metric"),
    ],
)
def test_a_bad_config_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "training.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_training_config(path)


def test_no_row_cap_means_no_subsample(network_spec: DatasetSpec) -> None:
    train = generate(network_spec, 500, seed=1)
    assert cv_sample(train, network_spec, None, 42) is train
    assert cv_sample(train, network_spec, 500, 42) is train


def test_above_the_cap_the_cv_sample_is_stratified_and_repeatable(network_spec: DatasetSpec) -> None:
    train = generate(network_spec, 5000, seed=1).assign(row_id=np.arange(5000))
    sample = cv_sample(train, network_spec, 1000, 42)
    target, positive = network_spec.target.name, network_spec.positive_class
    assert len(sample) == 1000 and sample["row_id"].is_unique
    assert (sample[target] == positive).mean() == pytest.approx((train[target] == positive).mean(), abs=0.002)
    assert sample["row_id"].tolist() == cv_sample(train, network_spec, 1000, 42)["row_id"].tolist()
    assert sample["row_id"].tolist() != cv_sample(train, network_spec, 1000, 43)["row_id"].tolist()


def test_one_candidate_scores_as_the_loop_does(network_spec: DatasetSpec) -> None:
    """A mapped task scores one candidate; the in-process loop must give it the same rows and folds."""
    train = generate(network_spec, 1500, seed=3)
    preprocessor = build_preprocessor(network_spec)
    looped = cross_validate_candidates(preprocessor, train, network_spec, SMALL)
    alone = cross_validate_candidate(
        preprocessor,
        cv_sample(train, network_spec, SMALL.cv_max_rows, SMALL.seed),
        network_spec,
        SMALL,
        "gradient_boosting",
    )
    assert [r.name for r in looped] == list(SMALL.candidates)
    assert looped[1].cv_metrics == alone.cv_metrics
    assert alone.cv_rows == 600 and alone.seconds > 0
    assert 0.5 < alone.cv_metrics["cv_roc_auc_mean"] <= 1.0


def _forest_cv_in_a_daemon(spec: DatasetSpec, sink) -> None:
    import warnings

    train = generate(spec, 400, seed=3)
    config = TrainingConfig(cv_folds=2, seed=1, candidates={"random_forest": {"n_estimators": 4, "n_jobs": -1}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cross_validate_candidate(build_preprocessor(spec), train, spec, config, "random_forest")
    sink.put([str(w.message) for w in caught])


def test_the_forest_keeps_its_threads_in_a_daemonic_worker(network_spec: DatasetSpec) -> None:
    """A Celery worker's task processes are daemonic, where joblib's default backend (loky)
    falls back to n_jobs=1 with a warning; the CV must run the forest on threads there."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    sink = context.Queue()
    process = context.Process(target=_forest_cv_in_a_daemon, args=(network_spec, sink), daemon=True)
    process.start()
    messages = sink.get(timeout=120)
    process.join(timeout=30)
    assert process.exitcode == 0
    assert not [m for m in messages if "n_jobs=1" in m or "Loky" in m], messages


def test_an_unknown_candidate_is_refused(network_spec: DatasetSpec) -> None:
    train = generate(network_spec, 200, seed=3)
    with pytest.raises(ValueError, match="'random_forest' is not a candidate"):
        cross_validate_candidate(build_preprocessor(network_spec), train, network_spec, SMALL, "random_forest")


def test_best_is_the_highest_mean_and_ties_go_to_the_earlier() -> None:
    results = [result("logistic_regression", 0.95), result("random_forest", 0.97), result("gradient_boosting", 0.97)]
    assert best_candidate(results, "roc_auc").name == "random_forest"
    with pytest.raises(ValueError, match="no candidate results"):
        best_candidate([], "roc_auc")


def test_the_select_step_needs_every_candidate_once() -> None:
    check_results([result("gradient_boosting", 0.9), result("logistic_regression", 0.9)], SMALL)
    with pytest.raises(ValueError, match="do not match the training config's candidates"):
        check_results([result("logistic_regression", 0.9)], SMALL)
    with pytest.raises(ValueError, match="do not match"):
        check_results([result("logistic_regression", 0.9)] * 2, SMALL)


def test_results_and_assignments_survive_xcom() -> None:
    scored = CandidateResult("random_forest", {"n_jobs": -1}, {"cv_roc_auc_mean": 0.9}, cv_rows=10, run_id="abc")
    assert CandidateResult.from_xcom(scored.as_xcom()) == scored
    training_run = {"run_id": "p1", "experiment_id": "3", "git_sha": "f00", "candidates": ["a", "b"]}
    assignments = candidate_assignments(training_run)
    assert [a["candidate"] for a in assignments] == ["a", "b"]
    assert all(a["run_id"] == "p1" for a in assignments)
    assert parent_run(assignments) == training_run


def test_assignments_of_two_parent_runs_are_refused() -> None:
    one = candidate_assignments({"run_id": "p1", "candidates": ["a"]})
    two = candidate_assignments({"run_id": "p2", "candidates": ["b"]})
    with pytest.raises(ValueError, match="share one parent run"):
        parent_run(one + two)
    with pytest.raises(ValueError, match="none"):
        parent_run([])
