"""Compiled predictors give exactly the pipeline's answers, for every estimator the project trains."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from serving.predictor import CompiledPredictor, Predictor, _OneHotBlock, build_predictor, probe_sample
from tasks.datagen import generate
from tasks.dataset_spec import load_spec
from tasks.transform import build_preprocessor

ESTIMATORS = {
    "gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=20, random_state=0),
    "random_forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=6, random_state=0),
    "logistic_regression": lambda: LogisticRegression(max_iter=500),
}


def _fitted(dataset: str, estimator) -> tuple[Pipeline, list[tuple], object]:
    spec = load_spec(dataset)
    frame = generate(spec, 400, seed=3)
    pipeline = Pipeline([("preprocess", build_preprocessor(spec)), ("model", estimator)])
    pipeline.fit(frame[spec.feature_names], frame[spec.target.name])
    rows = list(frame[spec.feature_names].itertuples(index=False, name=None))
    return pipeline, rows, spec


@pytest.mark.parametrize("dataset", ["network_security", "intrusion_flows"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_compiled_predictor_answers_exactly_as_the_pipeline(dataset, name):
    pipeline, rows, spec = _fitted(dataset, ESTIMATORS[name]())
    predictor = build_predictor(pipeline, spec.features)
    frame = pd.DataFrame(rows, columns=spec.feature_names).astype({c.name: c.dtype for c in spec.features})

    labels, probabilities = predictor.predict(rows)
    each_labels, each_probabilities = predictor.predict_each(rows[:12])

    assert isinstance(predictor, CompiledPredictor)
    assert np.array_equal(labels, pipeline.predict(frame))
    assert np.abs(probabilities - pipeline.predict_proba(frame)).max() <= 1e-9
    single = [pipeline.predict_proba(frame.iloc[[i]])[0] for i in range(12)]
    assert np.array_equal(each_labels, labels[:12]) and np.abs(each_probabilities - np.vstack(single)).max() <= 1e-12


def test_boosting_scores_on_one_thread_and_a_micro_batch_in_one_call():
    pipeline, rows, spec = _fitted("network_security", ESTIMATORS["gradient_boosting"]())
    predictor = build_predictor(pipeline, spec.features)
    calls = []
    real = predictor.estimator._raw_predict
    predictor.estimator._raw_predict = lambda X, n_threads=None: calls.append(n_threads) or real(X, n_threads)

    predictor.predict_each(rows[:8])

    assert "on one thread" in predictor.describe() and predictor.batch_invariant
    assert calls == [1]  # eight single-record requests, one model call, one OpenMP thread


@pytest.mark.parametrize("name", ["gradient_boosting", "random_forest"])
def test_a_large_batch_scored_in_parallel_parts_is_exactly_one_call(monkeypatch: pytest.MonkeyPatch, name):
    import serving.predictor as predictor_module

    pipeline, _, spec = _fitted("network_security", ESTIMATORS[name]())
    predictor = build_predictor(pipeline, spec.features)
    rows = list(generate(spec, 6000, seed=9)[spec.feature_names].itertuples(index=False, name=None))
    monkeypatch.setattr(predictor_module.os, "cpu_count", lambda: 2)
    parts = []
    real = predictor_module._in_parts

    def counted(score, features):
        parts.append(min(2, len(features) // predictor_module.ROWS_PER_PART))
        return real(score, features)

    monkeypatch.setattr(predictor_module, "_in_parts", counted)

    labels, probabilities = predictor.predict(rows)

    assert parts == [2]  # two parts of 3,000 rows
    frame = pd.DataFrame(rows, columns=spec.feature_names).astype({c.name: c.dtype for c in spec.features})
    assert np.array_equal(labels, pipeline.predict(frame))
    assert np.array_equal(probabilities, pipeline.predict_proba(frame))


def test_a_batch_given_as_a_matrix_is_scored_like_its_rows():
    pipeline, rows, spec = _fitted("network_security", ESTIMATORS["gradient_boosting"]())
    predictor = build_predictor(pipeline, spec.features)
    from_rows, from_matrix = predictor.predict(rows), predictor.predict(np.array(rows, dtype=np.float64))
    assert all(np.array_equal(a, b) for a, b in zip(from_rows, from_matrix, strict=True))


def test_a_pipeline_the_compiler_does_not_know_is_served_as_it_is():
    spec = load_spec("network_security")
    frame = generate(spec, 200, seed=4)
    odd = Pipeline([("preprocess", FunctionTransformer()), ("model", LogisticRegression(max_iter=200))])
    odd.fit(frame[spec.feature_names], frame[spec.target.name])
    predictor = build_predictor(odd, spec.features)
    assert type(predictor) is Predictor and predictor.kind == "pipeline"


class _Names:
    def __init__(self, count: int) -> None:
        self.feature_names = [f"f{i}" for i in range(count)]
        self.columns = [type("Column", (), {"dtype": "int8"})()] * count


@pytest.mark.parametrize("unknown_is_error", [False, True])
def test_the_one_hot_block_matches_one_comparison_per_feature(unknown_is_error):
    categories = [np.array([-1, 0, 1]), np.array([0, 1]), np.array([2, 5, 7, 9])] * 3
    block = _OneHotBlock(list(range(9)), categories, np.dtype("float32"), unknown_is_error, ["int8"] * 9)
    rng = np.random.default_rng(0)
    known = np.column_stack([rng.choice(c, 500) for c in categories]).astype(np.float64)
    unknown = known.copy()
    unknown[[3, 4, 5], [0, 1, 2]] = [2.0, np.nan, 6.0]

    assert np.array_equal(block.transform(known.copy(), _Names(9)), block._feature_by_feature(known, _Names(9)))
    if unknown_is_error:
        with pytest.raises(ValueError, match="unknown category in feature 'f0'"):
            block.transform(unknown.copy(), _Names(9))
    else:
        expected = block._feature_by_feature(unknown, _Names(9))
        assert np.array_equal(block.transform(unknown.copy(), _Names(9)), expected)
        assert expected[3, :3].sum() == 0  # an unknown value: its feature's columns stay 0


def test_probe_rows_respect_the_spec():
    spec = load_spec("intrusion_flows")
    rows = probe_sample(spec.features, 50)
    for column, values in zip(spec.features, zip(*rows, strict=True), strict=True):
        assert min(values) >= (column.min_value if column.min_value is not None else -np.inf)
        assert max(values) <= (column.max_value if column.max_value is not None else np.inf)
