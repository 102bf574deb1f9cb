"""skops trusted types: exactly what our pipelines need, nothing silently trusted."""

from __future__ import annotations

import pytest
import skops.io
from sklearn.pipeline import Pipeline

from tasks.datagen import generate
from tasks.dataset_spec import available_datasets, load_spec
from tasks.model_io import SKOPS_TRUSTED_TYPES, dump_skops, load_skops
from tasks.train import ESTIMATORS
from tasks.transform import build_preprocessor


@pytest.mark.parametrize("dataset", available_datasets())
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_allowed_pipeline_round_trips_with_the_listed_types(dataset, estimator):
    spec = load_spec(dataset)
    frame = generate(spec, 300, seed=3)
    params = (
        {"max_iter": 5}
        if estimator == "gradient_boosting"
        else {"n_estimators": 3}
        if estimator == "random_forest"
        else {}
    )
    pipeline = Pipeline([("preprocess", build_preprocessor(spec)), ("model", ESTIMATORS[estimator](params, 0))])
    pipeline.fit(frame[spec.feature_names], frame[spec.target.name])
    body = dump_skops(pipeline)

    assert set(skops.io.get_untrusted_types(data=body)) <= set(SKOPS_TRUSTED_TYPES)
    loaded = load_skops(body)
    assert (loaded.predict(frame[spec.feature_names]) == pipeline.predict(frame[spec.feature_names])).all()
