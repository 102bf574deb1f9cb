"""The HTTP contract: probes, authentication, validation (422 naming the field) and predictions."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from serving.model_store import ModelHandle, ModelStore
from tests.serving.conftest import ADMIN_KEY, API_KEY, Registry, make_log, make_settings, record_of, serving_client

PROTECTED = [
    ("GET", "/model", None, API_KEY),
    ("POST", "/predict", "record", API_KEY),
    ("POST", "/predict/batch", "batch", API_KEY),
    ("POST", "/admin/reload", None, ADMIN_KEY),
]


def _body(kind: str | None, registry: Registry) -> Any:
    record = record_of(registry.features, 0)
    return {"record": record, "batch": {"records": [record]}, None: None}[kind]


def _samples(text: str, name: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_probes_and_metrics_are_open(api: TestClient):
    assert api.get("/health").json() == {"status": "ok", "model_version": None, "detail": None, "models": None}
    ready = api.get("/ready")
    assert (ready.status_code, ready.json()["model_version"]) == (200, "1")
    assert ready.json()["models"] == {"network_security": "1"}
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "model_info" in metrics.text


@pytest.mark.parametrize(("method", "path", "body", "key"), PROTECTED)
def test_protected_endpoints_need_their_key(api: TestClient, registry: Registry, method, path, body, key):
    payload = _body(body, registry)
    other_key = ADMIN_KEY if key == API_KEY else API_KEY

    missing = api.request(method, path, json=payload)
    wrong = api.request(method, path, json=payload, headers={"X-API-Key": "not-the-key"})
    other = api.request(method, path, json=payload, headers={"X-API-Key": other_key})
    right = api.request(method, path, json=payload, headers={"X-API-Key": key})

    assert (missing.status_code, missing.json()["detail"]) == (401, "missing X-API-Key header")
    assert (wrong.status_code, wrong.json()["detail"]) == (403, "invalid API key")
    assert other.status_code == 403  # the predict key opens no admin route, the admin key no prediction
    assert right.status_code == 200, right.text


def test_a_non_ascii_key_is_refused_not_a_server_error(api: TestClient):
    answer = api.get("/model", headers={"X-API-Key": "cl\xe9".encode("latin-1")})
    assert answer.status_code == 403


def test_without_a_configured_key_the_server_is_open_when_allowed(champion_is_v1: Registry, aws: Any):
    settings = make_settings(champion_is_v1, api_key=None, allow_no_api_key=True)
    with serving_client(create_app(settings, prediction_log=make_log(aws))) as client:
        assert client.get("/model").json()["model_version"] == "1"


def _without(record: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != name}


INVALID_RECORDS = [
    ("missing field", lambda r: _without(r, "SFH"), "SFH", "missing"),
    ("extra field", lambda r: {**r, "colour": 1}, "colour", "extra_forbidden"),
    ("value outside the allowed set", lambda r: {**r, "port": 2}, "port", "literal_error"),
    ("string instead of int", lambda r: {**r, "Favicon": "1"}, "Favicon", "int_type"),
    ("float instead of int", lambda r: {**r, "Favicon": 1.0}, "Favicon", "int_type"),
    ("boolean instead of int", lambda r: {**r, "Iframe": True}, "Iframe", "int_type"),
    ("null", lambda r: {**r, "Redirect": None}, "Redirect", "int_type"),
]


@pytest.mark.parametrize(
    ("change", "field", "error_type"), [case[1:] for case in INVALID_RECORDS], ids=[case[0] for case in INVALID_RECORDS]
)
def test_invalid_record_is_a_422_naming_the_field(api, auth, registry, change, field, error_type):
    answer = api.post("/predict", json=change(record_of(registry.features, 0)), headers=auth)

    assert answer.status_code == 422
    errors = answer.json()["detail"]
    assert [(e["loc"], e["type"]) for e in errors] == [(["body", field], error_type)]


def test_invalid_record_in_a_batch_names_its_position_and_field(api, auth, registry):
    records = [record_of(registry.features, i) for i in range(5)]
    records[3]["port"] = 2

    answer = api.post("/predict/batch", json={"records": records}, headers=auth)

    assert answer.status_code == 422
    assert [e["loc"] for e in answer.json()["detail"]] == [["body", "records", 3, "port"]]


@pytest.mark.parametrize(("size", "error_type"), [(0, "too_short"), (51, "too_long")])
def test_batch_size_is_bounded(api, auth, registry, size, error_type):
    records = [record_of(registry.features, i) for i in range(size)]

    answer = api.post("/predict/batch", json={"records": records}, headers=auth)

    assert answer.status_code == 422
    assert [(e["loc"], e["type"]) for e in answer.json()["detail"]] == [(["body", "records"], error_type)]


@pytest.mark.parametrize("body", [b"{not json", b"[]", b"null"])
def test_malformed_bodies_are_422(api, auth, body):
    answer = api.post("/predict", content=body, headers={**auth, "Content-Type": "application/json"})
    assert answer.status_code == 422


def test_single_predictions_match_the_pipeline(api, auth, registry, spec):
    pipeline = registry.pipelines["1"]
    rows = registry.features.iloc[:25]
    positive = list(pipeline.classes_).index(spec.positive_class)
    expected_labels = pipeline.predict(rows).tolist()
    # One row at a time, as the server scores them: float32 batches may differ in the last bit.
    expected_probabilities = [float(pipeline.predict_proba(rows.iloc[[i]])[0, positive]) for i in range(len(rows))]

    answers = [api.post("/predict", json=record_of(rows, i), headers=auth).json() for i in range(len(rows))]

    assert [a["label"] for a in answers] == expected_labels
    assert [a["probability"] for a in answers] == expected_probabilities
    assert {a["model_version"] for a in answers} == {"1"}
    assert {a["model_name"] for a in answers} == {registry.model_name}
    assert len({a["request_id"] for a in answers}) == len(rows)
    # Labels are the spec's own values (-1 = phishing), both of which this sample contains.
    assert set(expected_labels) == set(spec.target.allowed_values)


def test_batch_predictions_match_the_pipeline_in_order(api, auth, registry, spec):
    pipeline = registry.pipelines["1"]
    rows = registry.features.iloc[100:140]
    positive = list(pipeline.classes_).index(spec.positive_class)

    answer = api.post("/predict/batch", json={"records": [record_of(rows, i) for i in range(len(rows))]}, headers=auth)

    assert answer.status_code == 200
    body = answer.json()
    assert body["model_version"] == "1"
    assert [p["label"] for p in body["predictions"]] == pipeline.predict(rows).tolist()
    assert [p["probability"] for p in body["predictions"]] == pipeline.predict_proba(rows)[:, positive].tolist()
    assert [p["request_id"] for p in body["predictions"]] == [f"{body['request_id']}:{i}" for i in range(len(rows))]
    assert answer.headers["X-Request-ID"] == body["request_id"]


def test_a_tame_caller_request_id_is_kept_and_a_wild_one_replaced(api, auth, registry):
    record = record_of(registry.features, 0)
    kept = api.post("/predict", json=record, headers={**auth, "X-Request-ID": "gateway-42"})
    replaced = api.post("/predict", json=record, headers={**auth, "X-Request-ID": "a b\tc"})

    assert kept.json()["request_id"] == "gateway-42"
    assert replaced.json()["request_id"] not in ("a b\tc", "")


def test_model_endpoint_shows_the_champion_and_its_training_data(api, auth, registry):
    info = api.get("/model", headers=auth).json()

    assert info["model_name"] == registry.model_name
    assert info["model_version"] == "1"
    assert info["alias"] == "champion"
    assert info["training_data_sha256"] == registry.content_hashes["1"]
    assert len(info["run_id"]) == 32
    assert dt.datetime.fromisoformat(info["loaded_at"]).tzinfo is not None


def test_a_pinned_version_wins_over_the_alias(champion_is_v1: Registry, aws: Any, auth):
    settings = make_settings(champion_is_v1, model_version="2")
    with serving_client(create_app(settings, prediction_log=make_log(aws))) as client:
        info = client.get("/model", headers=auth).json()

    assert (info["model_version"], info["alias"]) == ("2", None)
    # v2 has no content_sha256 tag: the hash comes from its run's lineage.json.
    assert info["training_data_sha256"] == champion_is_v1.content_hashes["2"]


def test_metrics_count_requests_and_predictions_by_model_version(api, auth, registry):
    rows = registry.features.iloc[:6]
    for i in range(3):
        api.post("/predict", json=record_of(rows, i), headers=auth)
    api.post("/predict/batch", json={"records": [record_of(rows, i) for i in range(3, 6)]}, headers=auth)
    api.get("/model")  # 401
    expected_labels = registry.pipelines["1"].predict(rows).tolist()

    text = api.get("/metrics").text

    predicted = {(s.labels["label"], s.labels["model_version"]): s.value for s in _samples(text, "predictions_total")}
    assert predicted == {(str(label), "1"): float(expected_labels.count(label)) for label in set(expected_labels)}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in _samples(text, "http_requests_total")}
    assert requests[("/predict", "200")] == 3
    assert requests[("/predict/batch", "200")] == 1
    assert requests[("/model", "401")] == 1
    latency = {s.labels["endpoint"]: s.value for s in _samples(text, "http_request_duration_seconds_count")}
    assert latency["/predict"] == 3
    (info,) = _samples(text, "model_info")
    assert (info.labels["model_version"], info.labels["alias"], info.value) == ("1", "champion", 1.0)
    (enqueued,) = _samples(text, "prediction_log_enqueued_total")
    assert enqueued.value == 6
    assert [s.value for s in _samples(text, "prediction_log_dropped_total")] == [0.0]


def test_unknown_paths_share_one_metrics_label(api):
    for path in ("/nope", "/nope/1", "/wp-admin"):
        assert api.get(path).status_code == 404
    text = api.get("/metrics").text
    endpoints = {s.labels["endpoint"] for s in _samples(text, "http_requests_total")}
    assert "unmatched" in endpoints and not endpoints & {"/nope", "/nope/1", "/wp-admin"}


class _BrokenPipeline:
    classes_ = np.array([-1, 1])

    def predict(self, frame):
        raise RuntimeError("corrupted coefficients")

    predict_proba = predict


def test_a_failing_model_is_a_503_with_a_clear_message(champion_is_v1: Registry, aws: Any, auth):
    store = ModelStore(tracking_uri=champion_is_v1.tracking_uri, model_name=champion_is_v1.model_name)
    store.swap(
        ModelHandle(_BrokenPipeline(), champion_is_v1.model_name, "7", None, None, dt.datetime.now(dt.UTC), "champion")
    )
    app = create_app(make_settings(champion_is_v1), store=store, prediction_log=make_log(aws))
    with serving_client(app) as client:
        answer = client.post("/predict", json=record_of(champion_is_v1.features, 0), headers=auth)
        logged = app.state.prediction_log.stats()["enqueued"]

    assert answer.status_code == 503
    assert answer.json()["detail"] == "model network_security v7 failed to score the request (RuntimeError)"
    assert "Traceback" not in answer.text
    assert logged == 0


def test_without_a_model_the_server_is_alive_but_not_ready(champion_is_v1: Registry, aws: Any, auth):
    settings = make_settings(champion_is_v1, model_name="no_such_model")
    with serving_client(create_app(settings, prediction_log=make_log(aws)), ready=False) as client:
        health, ready = client.get("/health"), client.get("/ready")
        predict = client.post("/predict", json=record_of(champion_is_v1.features, 0), headers=auth)
        model = client.get("/model", headers=auth)

    assert health.status_code == 200
    assert ready.status_code == 503
    assert "no_such_model@champion" in ready.json()["detail"]
    assert predict.status_code == 503 and predict.json()["detail"].startswith("no model loaded")
    assert model.status_code == 503


def test_openapi_documents_the_record_fields_from_the_spec(api, spec):
    schema = api.get("/openapi.json").json()["components"]["schemas"]["NetworkSecurityRecord"]

    assert sorted(schema["required"]) == sorted(spec.feature_names)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["port"]["enum"] == [-1, 0, 1]
