"""The edge: keys before bodies, the body cap, the concurrency limit, fixed metric labels, the admin routes.

TestClient here; the same edge against a real uvicorn process (a 200 MB upload while
``/health`` is timed) is in ``test_real_server.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

import serving.app as app_module
from serving.app import create_app
from serving.edge import ROUTES, UNMATCHED, Edge, EdgeMetrics, EdgePolicy, route_of
from serving.model_store import ModelStore
from tests.serving.conftest import API_KEY, Registry, make_log, make_settings, record_of, serving_client


class _BlockedLoads:
    """Makes a store's loads wait until released (a slow model download)."""

    def __init__(self, store: ModelStore) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        real_load = store.load

        def load(version: str) -> Any:
            self.started.set()
            assert self.release.wait(20), "the test never released the load"
            return real_load(version)

        store.load = load  # type: ignore[method-assign]


def _store(registry: Registry) -> ModelStore:
    return ModelStore(tracking_uri=registry.tracking_uri, model_name=registry.model_name)


def test_every_route_of_the_app_has_a_fixed_label_at_the_edge(api):
    for route in api.app.routes:
        if isinstance(route, APIRoute):
            path = route.path.replace("{name}", "some_model")
            assert route_of(path)[0] == route.path, route.path
    assert route_of("/wp-admin/setup.php") == (UNMATCHED, "open")
    assert route_of("/admin/anything")[1] == "admin"  # unknown admin paths still need the admin key
    assert len(ROUTES) == len({label for _, label, _ in ROUTES})


def test_metric_labels_never_take_what_the_client_sends(api, auth):
    api.request("FROBNICATE", "/predict", headers=auth)
    api.get("/no/such/path/123")
    text = api.get("/metrics").text

    lines = [line for line in text.splitlines() if line.startswith("http_requests_total{")]
    assert any('method="other"' in line and 'endpoint="/predict"' in line for line in lines)
    assert not any("FROBNICATE" in line or "/no/such" in line for line in lines)


def test_a_body_over_the_cap_is_413_before_it_is_parsed(champion_is_v1: Registry, aws: Any, auth):
    settings = make_settings(champion_is_v1, max_body_bytes=2_000)
    record = record_of(champion_is_v1.features, 0)
    with serving_client(create_app(settings, prediction_log=make_log(aws))) as client:
        fits = client.post("/predict", json=record, headers=auth)
        declared = client.post("/predict/batch", json={"records": [record] * 5}, headers=auth)
        # No Content-Length (chunked): counted as it arrives.
        streamed = client.post(
            "/predict/batch",
            content=(b"x" * 500 for _ in range(10)),
            headers={**auth, "Content-Type": "application/json"},
        )
        logged = client.app.state.prediction_log.stats()["enqueued"]

    assert fits.status_code == 200
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert declared.json()["detail"] == (
        "request body larger than 2,000 bytes (MAX_BODY_BYTES; batches hold at most MAX_BATCH_SIZE records)"
    )
    assert logged == 1


def test_the_default_cap_fits_a_full_batch_of_the_widest_records(settings, spec):
    # A batch of max_batch_size records written with generous whitespace still fits.
    record = "{" + ", ".join(f'"{name}": -1' for name in spec.feature_names) + "}"
    body = '{"records": [' + ",\n  ".join([record] * settings.max_batch_size) + "]}"
    assert len(body) < settings.body_limit([spec.feature_names]) < 40 * len(body)


@pytest.mark.parametrize(
    ("headers", "status"),
    [([], 401), ([(b"x-api-key", b"wrong")], 403), ([(b"x-api-key", b"k"), (b"content-length", b"999999")], 413)],
)
def test_the_key_and_the_declared_size_are_checked_before_the_body_is_read(headers, status):
    received, sent = [], []

    async def receive() -> dict[str, Any]:
        received.append(True)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:
        raise AssertionError("the app must not run")

    policy = EdgePolicy(b"k", b"admin", False, lambda: 1000, 4, lambda: None)
    edge = Edge(app, policy, EdgeMetrics(CollectorRegistry()))
    scope = {"type": "http", "method": "POST", "path": "/predict/batch", "headers": headers}
    asyncio.run(edge(scope, receive, send))

    assert received == []
    assert sent[0]["status"] == status and (b"connection", b"close") in sent[0]["headers"]


def test_admin_routes_are_off_without_an_admin_key(champion_is_v1: Registry, aws: Any, auth):
    settings = make_settings(champion_is_v1, admin_api_key=None)
    with serving_client(create_app(settings, prediction_log=make_log(aws))) as client:
        answer = client.post("/admin/reload", headers=auth)

    assert answer.status_code == 403
    assert answer.json()["detail"] == "admin API disabled: set ADMIN_API_KEY (or ADMIN_API_KEY_FILE) on the server"


def test_a_server_listens_and_is_not_ready_while_its_model_loads(champion_is_v1: Registry, aws: Any, auth):
    store = _store(champion_is_v1)
    blocked = _BlockedLoads(store)
    app = create_app(make_settings(champion_is_v1), store=store, prediction_log=make_log(aws))
    with serving_client(app, ready=False) as client:
        assert blocked.started.wait(10)
        health, ready = client.get("/health"), client.get("/ready")
        predict = client.post("/predict", json=record_of(champion_is_v1.features, 0), headers=auth)
        blocked.release.set()
        assert store.wait_until_loaded(10)
        after = client.get("/ready")

    assert health.status_code == 200
    assert (ready.status_code, ready.json()["detail"]) == (
        503,
        f"network_security: loading network_security@champion from {store.tracking_uri}",
    )
    assert predict.status_code == 503 and "retry when /ready answers 200" in predict.json()["detail"]
    assert (after.status_code, after.json()["model_version"]) == (200, "1")


def test_a_reload_while_one_runs_is_409_and_holds_no_worker_thread(champion_is_v1: Registry, aws: Any, admin, auth):
    store = _store(champion_is_v1)
    app = create_app(
        make_settings(champion_is_v1, max_concurrent_requests=3), store=store, prediction_log=make_log(aws)
    )
    with serving_client(app) as client:
        blocked = _BlockedLoads(store)
        champion_is_v1.move_alias("champion", "2")
        first: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: first.update(answer=client.post("/admin/reload", headers=admin)))
        waiter.start()
        assert blocked.started.wait(10)
        second = client.post("/admin/reload", headers=admin)
        # The waiting reload holds no thread of the pool: predictions are still answered meanwhile.
        predictions = [
            client.post("/predict", json=record_of(champion_is_v1.features, i), headers=auth) for i in range(3)
        ]
        blocked.release.set()
        waiter.join(20)

    assert (second.status_code, second.headers["retry-after"]) == (409, "1")
    assert second.json()["detail"] == "a load of network_security is running; retry when it is done"
    assert {p.status_code for p in predictions} == {200}
    assert first["answer"].json() == {"old_version": "1", "new_version": "2", "reloaded": True}


def test_past_the_concurrency_limit_requests_get_503_with_retry_after(champion_is_v1: Registry, aws: Any, admin, auth):
    store = _store(champion_is_v1)
    app = create_app(
        make_settings(champion_is_v1, max_concurrent_requests=1), store=store, prediction_log=make_log(aws)
    )
    with serving_client(app) as client:
        blocked = _BlockedLoads(store)
        champion_is_v1.move_alias("champion", "2")
        waiter = threading.Thread(target=lambda: client.post("/admin/reload", headers=admin))
        waiter.start()
        assert blocked.started.wait(10)
        busy = client.post("/predict", json=record_of(champion_is_v1.features, 0), headers=auth)
        health = client.get("/health")  # probes are never limited
        blocked.release.set()
        waiter.join(20)
        after = client.post("/predict", json=record_of(champion_is_v1.features, 0), headers=auth)
        shed = client.get("/metrics").text

    assert (busy.status_code, busy.headers["retry-after"]) == (503, "1")
    assert busy.json()["detail"].startswith("server busy: 1 requests in progress (MAX_CONCURRENT_REQUESTS)")
    assert health.status_code == 200 and after.status_code == 200
    assert 'http_requests_shed_total{endpoint="/predict",reason="busy"} 1.0' in shed


def test_the_module_app_is_built_once(monkeypatch: pytest.MonkeyPatch):
    built = []
    monkeypatch.setattr(app_module, "create_app", lambda: built.append(object()) or built[-1])
    monkeypatch.delitem(app_module.__dict__, "app", raising=False)
    try:
        first, second = app_module.app, app_module.app
    finally:
        app_module.__dict__.pop("app", None)
    assert first is second and len(built) == 1


def test_the_admin_key_must_differ_from_the_predict_key():
    from serving.config import ConfigError, ServingSettings

    with pytest.raises(ConfigError, match="ADMIN_API_KEY equals API_KEY"):
        ServingSettings(api_key=API_KEY, admin_api_key=API_KEY)


def test_answers_carry_the_request_id_also_when_refused_early(api):
    answer = api.get("/model", headers={"X-Request-ID": "trace-1"})
    assert (answer.status_code, answer.headers["x-request-id"]) == (401, "trace-1")
    started = time.monotonic()
    assert api.get("/health").status_code == 200 and time.monotonic() - started < 5
