"""Model store: alias resolution, safe loading, reloads without downtime and alias polling."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from sklearn.dummy import DummyClassifier

from serving.app import create_app
from serving.model_store import ModelStore, ModelUnavailable
from tasks.model_io import SKOPS_TRUSTED_TYPES
from tests.serving.conftest import PIP_REQUIREMENTS, Registry, make_log, make_settings, record_of, serving_client


def _positive_probability(registry: Registry, version: str, record: dict[str, int], spec) -> float:
    pipeline = registry.pipelines[version]
    frame = registry.features.iloc[:0].copy()
    frame.loc[0] = record
    frame = frame.astype(registry.features.dtypes.to_dict())
    return float(pipeline.predict_proba(frame)[0, list(pipeline.classes_).index(spec.positive_class)])


def test_reload_after_the_alias_moved_serves_the_new_version(api, auth, admin, champion_is_v1: Registry, spec):
    record = record_of(champion_is_v1.features, 7)
    before = api.post("/predict", json=record, headers=auth).json()

    champion_is_v1.move_alias("champion", "2")
    reloaded = api.post("/admin/reload", headers=admin)
    after = api.post("/predict", json=record, headers=auth).json()
    again = api.post("/admin/reload", headers=admin).json()

    assert reloaded.status_code == 200
    assert reloaded.json() == {"old_version": "1", "new_version": "2", "reloaded": True}
    assert (before["model_version"], after["model_version"]) == ("1", "2")
    assert before["probability"] == _positive_probability(champion_is_v1, "1", record, spec)
    assert after["probability"] == _positive_probability(champion_is_v1, "2", record, spec)
    assert before["probability"] != after["probability"]
    assert again == {"old_version": "2", "new_version": "2", "reloaded": False}
    assert api.get("/model", headers=auth).json()["model_version"] == "2"


def test_requests_during_reloads_all_succeed_and_never_mix_versions(api, auth, admin, champion_is_v1: Registry, spec):
    records = [record_of(champion_is_v1.features, i) for i in range(8)]
    expected = {
        version: [_positive_probability(champion_is_v1, version, r, spec) for r in records] for version in ("1", "2")
    }
    answers: list[tuple[int, int, dict[str, Any]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer(worker: int) -> None:
        try:
            while not stop.is_set():
                i = len(answers) % len(records)
                response = api.post("/predict", json=records[i], headers=auth)
                answers.append((i, response.status_code, response.json()))
        except BaseException as err:  # surfaced by the assertion below
            failures.append(err)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    versions_served = []
    try:
        for version in ("2", "1", "2"):
            time.sleep(0.15)
            champion_is_v1.move_alias("champion", version)
            reload = api.post("/admin/reload", headers=admin)
            assert reload.status_code == 200, reload.text
            versions_served.append(reload.json()["new_version"])
        time.sleep(0.15)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    assert not failures
    assert versions_served == ["2", "1", "2"]
    assert len(answers) > 30
    assert {status for _, status, _ in answers} == {200}
    assert {body["model_version"] for _, _, body in answers} == {"1", "2"}
    # Each answer is exactly what the version it names computes: no request saw a half-swapped model.
    for i, _, body in answers:
        assert body["probability"] == expected[body["model_version"]][i]


def test_a_failed_reload_keeps_serving_the_old_model(champion_is_v1: Registry, aws: Any, auth, admin):
    client = MlflowClient(tracking_uri=champion_is_v1.tracking_uri)
    client.set_registered_model_alias(champion_is_v1.model_name, "staging", "1")
    settings = make_settings(champion_is_v1, model_alias="staging")
    try:
        with serving_client(create_app(settings, prediction_log=make_log(aws))) as api:
            client.delete_registered_model_alias(champion_is_v1.model_name, "staging")
            reload = api.post("/admin/reload", headers=admin)
            predict = api.post("/predict", json=record_of(champion_is_v1.features, 0), headers=auth)
    finally:
        client.delete_registered_model_alias(champion_is_v1.model_name, "staging")

    assert reload.status_code == 503
    assert reload.json()["detail"].startswith("reload failed, still serving 1: cannot resolve network_security@staging")
    assert (predict.status_code, predict.json()["model_version"]) == (200, "1")


def test_polling_follows_the_alias(champion_is_v1: Registry):
    store = ModelStore(tracking_uri=champion_is_v1.tracking_uri, model_name=champion_is_v1.model_name, poll_seconds=0.1)
    store.start()
    try:
        assert store.wait_until_loaded(10) and store.current.version == "1"
        champion_is_v1.move_alias("champion", "2")
        deadline = time.monotonic() + 10
        while store.current.version != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.current.version == "2"
        assert store.current.training_data_sha256 == champion_is_v1.content_hashes["2"]
    finally:
        store.stop()
    assert store._thread is None  # stopped within the timeout


def test_a_model_with_other_labels_than_the_dataset_is_refused(registry: Registry, spec):
    frame = registry.features.iloc[:40]
    wrong = DummyClassifier(strategy="prior").fit(frame, [0, 1] * 20)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serving-tests").experiment_id):
        mlflow.sklearn.log_model(
            wrong,
            name="model",
            serialization_format="skops",
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
            registered_model_name="wrong_labels",
            pip_requirements=PIP_REQUIREMENTS,
        )
    store = ModelStore(
        tracking_uri=registry.tracking_uri,
        model_name="wrong_labels",
        version="1",
        expected_classes=spec.target.allowed_values,
        expected_features=spec.feature_names,
    )

    with pytest.raises(
        ModelUnavailable, match=r"wrong_labels v1 predicts \[0, 1\], the dataset's labels are \[-1, 1\]"
    ):
        store.reload()
    assert store.current is None


def test_a_pickled_model_is_never_loaded(registry: Registry):
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serving-tests").experiment_id):
        mlflow.sklearn.log_model(
            registry.pipelines["1"],
            name="model",
            serialization_format="cloudpickle",
            registered_model_name="pickled",
            pip_requirements=PIP_REQUIREMENTS,
        )
    store = ModelStore(tracking_uri=registry.tracking_uri, model_name="pickled", version="1")

    with pytest.raises(ModelUnavailable, match="serialised as 'cloudpickle'; the server loads only skops"):
        store.reload()


def test_an_unreachable_registry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    # MLflow's client would otherwise retry a refused connection for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store = ModelStore(tracking_uri=f"http://127.0.0.1:{_closed_port()}", model_name="m")

    with pytest.raises(ModelUnavailable, match=r"cannot resolve m@champion at http://127\.0\.0\.1:\d+"):
        store.reload()
    assert store.current is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: nothing listens there
