"""skops trusted types: exactly what our pipelines need, nothing silently trusted; the one model loader."""

from __future__ import annotations

import pickle
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import skops.io
import yaml
from sklearn.pipeline import Pipeline

from tasks.datagen import generate
from tasks.dataset_spec import available_datasets, load_spec
from tasks.model_io import SKOPS_TRUSTED_TYPES, UnsafeModel, check_sklearn_flavor, dump_skops, load_model, load_skops
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


# --- load_model: the one loader of registered versions outside serving ----------------------


class WritesSentinel:
    """Unpickling this runs code: it writes ``path`` (what a hostile model version would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('unpickled')",))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real MLflow tracking store and registry (SQLite, local artifacts); yields (uri, tmp dir)."""
    import mlflow

    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    # The tracking URI names the registry too. No set_registry_uri: it also exports
    # MLFLOW_REGISTRY_URI, which would outlive this module and send later tests here.
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("model-io", artifact_location=(folder / "a").as_uri()))
    try:
        yield uri, folder
    finally:
        mlflow.set_tracking_uri(previous)


def fitted_pipeline(spec_name: str = "network_security") -> tuple[Pipeline, Any]:
    spec = load_spec(spec_name)
    frame = generate(spec, 300, seed=5)
    pipeline = Pipeline(
        [("preprocess", build_preprocessor(spec)), ("model", ESTIMATORS["random_forest"]({"n_estimators": 3}, 0))]
    )
    pipeline.fit(frame[spec.feature_names], frame[spec.target.name])
    return pipeline, frame[spec.feature_names]


def register(name: str, model: Any, **log_kwargs: Any) -> str:
    """Log ``model`` with the sklearn flavor, register it, point ``champion`` at it; returns the version."""
    import mlflow
    from mlflow import MlflowClient

    # Explicit requirements: inferring them would load (unpickle) the model in a subprocess.
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=name, pip_requirements=["scikit-learn"], **log_kwargs
        )
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(name, "champion", version)
    return version


def test_a_skops_version_loads_and_predicts(registry):
    uri, _ = registry
    pipeline, features = fitted_pipeline()
    version = register("io_skops", pipeline, serialization_format="skops", skops_trusted_types=SKOPS_TRUSTED_TYPES)
    loaded = load_model(uri, "io_skops", version)
    assert (loaded.predict(features) == pipeline.predict(features)).all()


@pytest.mark.parametrize("serialization", ["cloudpickle", "pickle"])
def test_a_pickled_version_is_refused_before_it_is_unpickled(registry, serialization):
    uri, folder = registry
    sentinel = folder / f"sentinel-{serialization}"
    version = register(f"io_{serialization}", WritesSentinel(sentinel), serialization_format=serialization)

    with pytest.raises(UnsafeModel) as err:
        load_model(uri, f"io_{serialization}", version)

    message = str(err.value)
    assert f"model 'io_{serialization}' version {version}" in message
    assert f"serialised as '{serialization}'" in message and "skops" in message
    assert not sentinel.exists(), "the model was unpickled"


def test_the_sentinel_model_really_runs_code_when_mlflow_unpickles_it(registry):
    """Control for the refusal above: the same kind of version, loaded by MLflow, writes its sentinel."""
    import mlflow.sklearn

    _, folder = registry
    sentinel = folder / "sentinel-control"
    version = register("io_control", WritesSentinel(sentinel), serialization_format="cloudpickle")
    mlflow.sklearn.load_model(f"models:/io_control/{version}")
    assert sentinel.read_text() == "unpickled"


def test_a_skops_version_declaring_extra_trusted_types_is_refused(registry):
    uri, _ = registry
    pipeline, _ = fitted_pipeline()
    extra = [*SKOPS_TRUSTED_TYPES, "builtins.eval", "os.system"]
    version = register("io_wide", pipeline, serialization_format="skops", skops_trusted_types=extra)

    with pytest.raises(UnsafeModel) as err:
        load_model(uri, "io_wide", version)

    assert f"model 'io_wide' version {version}" in str(err.value)
    assert "['builtins.eval', 'os.system']" in str(err.value)


def _register_artifacts(name: str, files: dict[str, bytes]) -> str:
    """A version made of hand-written artifacts (as anyone with registry write access could)."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        for file_name, body in files.items():
            (Path(folder) / file_name).write_bytes(body)
        with mlflow.start_run() as run:
            mlflow.log_artifacts(folder, "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)


def test_a_pickle_disguised_as_skops_is_not_unpickled(registry):
    uri, folder = registry
    sentinel = folder / "sentinel-disguised"
    mlmodel = yaml.safe_dump(
        {
            "flavors": {
                "sklearn": {
                    "pickled_model": "model.skops",
                    "serialization_format": "skops",
                    "skops_trusted_types": SKOPS_TRUSTED_TYPES,
                }
            }
        }
    )
    version = _register_artifacts(
        "io_disguised", {"MLmodel": mlmodel.encode(), "model.skops": pickle.dumps(WritesSentinel(sentinel))}
    )

    with pytest.raises(UnsafeModel, match="model.skops is not a readable skops file"):
        load_model(uri, "io_disguised", version)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("flavors", "expected"),
    [
        (
            {"python_function": {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}},
            "no sklearn flavor",
        ),
        (
            {"sklearn": {"pickled_model": "../../etc/passwd", "serialization_format": "skops"}},
            "not a file of the model",
        ),
    ],
    ids=["pyfunc-only", "path-outside-the-model"],
)
def test_other_hand_written_versions_are_refused(registry, flavors, expected):
    uri, _ = registry
    name = f"io_{len(expected)}"
    version = _register_artifacts(name, {"MLmodel": yaml.safe_dump({"flavors": flavors}).encode()})
    with pytest.raises(UnsafeModel, match=expected) as err:
        load_model(uri, name, version)
    assert f"version {version}" in str(err.value)


def test_the_flavor_check_reads_metadata_only():
    where = "model 'm' version 4"
    good = {"sklearn": {"serialization_format": "skops", "skops_trusted_types": SKOPS_TRUSTED_TYPES[:1]}}
    assert check_sklearn_flavor(good, where)["serialization_format"] == "skops"
    for flavors, expected in [
        ({}, "has no sklearn flavor"),
        ({"sklearn": {}}, "serialised as None"),
        ({"sklearn": {"serialization_format": "cloudpickle"}}, "serialised as 'cloudpickle'"),
        ({"sklearn": {"serialization_format": "skops", "skops_trusted_types": ["x.Y"]}}, "['x.Y']"),
    ]:
        with pytest.raises(UnsafeModel, match=re.escape(expected)) as err:
            check_sklearn_flavor(flavors, where)
        assert where in str(err.value)
