"""The model server: FastAPI app serving the registry's champion for one dataset.

Run it with ``uvicorn serving.app:create_app --factory`` (or ``python -m serving``);
settings come from the environment (see ``serving.config``).

Endpoints: ``GET /health`` (liveness), ``GET /ready`` (a model is loaded), ``GET /metrics``
(Prometheus), all open; ``GET /model``, ``POST /predict``, ``POST /predict/batch`` and
``POST /admin/reload`` need the ``X-API-Key`` header.
"""

# No `from __future__ import annotations` in this module: FastAPI reads the request-body
# types of the endpoints from their annotations, and those types are generated at run time
# from the dataset spec inside create_app, where string annotations could not be resolved.

import asyncio
import collections
import datetime as dt
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.batching import MicroBatcher
from serving.config import ServingSettings
from serving.edge import API_KEY_HEADER, Edge, EdgeMetrics, EdgePolicy
from serving.model_store import ModelHandle, ModelStore, ModelUnavailable
from serving.prediction_log import IndexedIds, LogChunk, LogUnavailable, PredictionLog, RecordEncoder
from serving.predictor import Predictor
from serving.schema import (
    BatchPrediction,
    ErrorDetail,
    ModelInfo,
    Prediction,
    ReloadResult,
    Status,
    batch_model,
    fast_decoder,
    record_model,
)
from tasks.dataset_spec import DatasetSpec, load_spec

log = logging.getLogger(__name__)

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "The X-API-Key header is missing."},
    403: {"model": ErrorDetail, "description": "The X-API-Key header is wrong."},
}
_NO_MODEL_RESPONSE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "No model is loaded, or the model failed."},
}
_UNREADABLE_BODY_RESPONSE: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The body cannot be decoded (e.g. not UTF-8)."},
}
_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "The X-API-Key header is missing."},
    403: {"model": ErrorDetail, "description": "The X-API-Key header is not the admin key (or the server has none)."},
    409: {"model": ErrorDetail, "description": "A model load is running; retry after it (Retry-After)."},
}
_PREDICTION_LOG_COUNTERS = {
    "enqueued": "Predictions handed to the prediction log (each one answered 200).",
    "written": "Predictions written to S3 (including those replayed from a previous run's spool).",
    "batches_written": "Objects written to S3 by the prediction log.",
    "write_failures": "Failed PUTs to S3; each is retried under the same key until it succeeds.",
    "replayed": "Predictions a previous run left in the spool, written to S3 by this one.",
    "dropped": "Predictions lost: still not written to S3 when a shutdown gave up waiting "
    "(PREDICTION_LOG_CLOSE_TIMEOUT_SECONDS) with no spool to keep them. While the server runs, nothing is "
    "dropped: past the high-water mark new predictions are refused (http_requests_shed_total).",
    "left_in_spool": "Predictions not yet written to S3 at shutdown, kept in the spool for the next start.",
}


class _ServingCollector(Collector):
    """Metrics read at scrape time from the store and the log, so they are never stale."""

    def __init__(self, store: ModelStore, prediction_log: PredictionLog | None) -> None:
        self.store = store
        self.prediction_log = prediction_log

    def collect(self) -> Iterable[Any]:
        handle = self.store.current
        info = GaugeMetricFamily(
            "model_info", "The model being served (value 1).", labels=["model_name", "model_version", "alias"]
        )
        if handle is not None:
            info.add_metric([handle.name, handle.version, handle.alias or ""], 1.0)
        yield info
        yield GaugeMetricFamily("model_loaded", "1 when a model is loaded and served.", value=float(handle is not None))
        if self.prediction_log is None:
            return
        stats = self.prediction_log.stats()
        for name, documentation in _PREDICTION_LOG_COUNTERS.items():
            yield CounterMetricFamily(f"prediction_log_{name}", documentation, value=stats[name])
        yield GaugeMetricFamily(
            "prediction_log_buffered_records",
            "Predictions handed to the log and not yet written to S3 (buffered, spooled or in a PUT).",
            value=stats["buffered"],
        )
        yield GaugeMetricFamily("prediction_log_puts_in_flight", "PUTs to S3 in progress.", value=stats["in_flight"])
        yield GaugeMetricFamily(
            "prediction_log_spool_bytes", "Bytes in the spool not yet written to S3.", value=stats["spool_bytes"]
        )


class _Metrics:
    def __init__(self, store: ModelStore, prediction_log: PredictionLog | None) -> None:
        self.registry = CollectorRegistry()
        self.edge = EdgeMetrics(self.registry)
        self.predictions = Counter(
            "predictions",
            "Predictions served, by predicted label and model version.",
            ["label", "model_version"],
            registry=self.registry,
        )
        self.micro_batch_records = Histogram(
            "predict_micro_batch_records",
            "Single-record requests scored together in one model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.registry.register(_ServingCollector(store, prediction_log))


FastHandler = Callable[[Request], Awaitable[Response | None]]


def _with_fast_lane(fast: FastHandler) -> type[APIRoute]:
    """A route class trying ``fast`` first and falling back to FastAPI's own handling.

    ``fast`` answers the requests it fully understands (authenticated, valid JSON) and
    returns None for anything else, which FastAPI then handles as declared (401/403,
    422 naming the field, ...), so the OpenAPI schema and every error stay FastAPI's.
    """

    class FastLaneRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            standard = super().get_route_handler()

            async def handler(request: Request) -> Response:
                response = await fast(request)
                return response if response is not None else await standard(request)

            return handler

    return FastLaneRoute


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.partition(";")[0].strip().lower() == "application/json"


def create_app(
    settings: ServingSettings | None = None,
    *,
    store: ModelStore | None = None,
    prediction_log: PredictionLog | None = None,
) -> FastAPI:
    """Build the model server.

    Args:
        settings: Configuration; read from the environment when omitted.
        store: Model store to serve from; built from ``settings`` when omitted.
        prediction_log: Where predictions are logged; built from ``settings`` when omitted
            (none when ``settings.prediction_log_bucket`` is empty).

    Returns:
        The app. Its lifespan loads the model and starts the prediction log at start-up,
        and stops polling and flushes the log at shutdown.

    Raises:
        ConfigError: The environment is invalid (e.g. no API key).
        SpecError: The dataset spec cannot be loaded.
    """
    if settings is None:
        settings = ServingSettings.from_env()
    spec = load_spec(settings.dataset)
    record_type = record_model(spec)
    batch_type = batch_model(record_type, settings.max_batch_size)
    decoder = fast_decoder(spec, settings.max_batch_size)
    if store is None:
        store = ModelStore.from_settings(settings, spec)
    if prediction_log is None and settings.prediction_log_enabled:
        prediction_log = PredictionLog.from_settings(settings)
    metrics = _Metrics(store, prediction_log)
    scorer = _Scorer(spec, store, prediction_log, metrics)
    # Single records are scored in micro-batches; each still gets the answer it would get alone.
    batcher: MicroBatcher[tuple[tuple[Any, ...], str], _PredictionBody] = MicroBatcher(
        scorer.answer_each,
        max_items=settings.micro_batch_max_records,
        window_seconds=settings.micro_batch_window_ms / 1000,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The spool (if any) is taken over first: a folder that cannot be used fails the start.
        if prediction_log is not None:
            await run_in_threadpool(prediction_log.start)
        # The model loads in the background: the server listens at once, /ready says when it serves.
        store.start()
        try:
            yield
        finally:
            await batcher.aclose()
            await run_in_threadpool(store.stop)
            if prediction_log is not None:
                await run_in_threadpool(prediction_log.close, settings.prediction_log_close_timeout_seconds)

    app = FastAPI(
        title="Network security model server",
        version="1.0.0",
        description=f"Serves {settings.model_name} ({_followed(settings)}) for the `{spec.name}` dataset.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.spec = spec
    app.state.store = store
    app.state.prediction_log = prediction_log
    app.state.metrics_registry = metrics.registry
    app.state.batcher = batcher

    predict_key = settings.api_key.encode() if settings.api_key else None
    admin_key = settings.admin_api_key.encode() if settings.admin_api_key else None
    body_limit = settings.body_limit([spec.feature_names])
    policy = EdgePolicy(
        predict_key=predict_key,
        admin_key=admin_key,
        admin_open=predict_key is None and admin_key is None,
        body_limit=lambda: body_limit,
        max_concurrent=settings.max_concurrent_requests,
        backlog_reason=prediction_log.backlog_reason if prediction_log is not None else lambda: None,
    )
    app.add_middleware(Edge, policy=policy, metrics=metrics.edge)
    app.state.edge_policy = policy

    # The edge has checked the key before the body was read; these dependencies check it again
    # (for a request that reached the app some other way) and document it in the OpenAPI schema.
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The server's API key.")
    admin_header = APIKeyHeader(
        name=API_KEY_HEADER, scheme_name="AdminKey", auto_error=False, description="The server's admin key."
    )

    def _check(key: str | None, expected: bytes | None) -> None:
        if expected is None:
            return
        if not key:
            raise HTTPException(401, detail=f"missing {API_KEY_HEADER} header")
        # As bytes: compare_digest refuses non-ASCII strings, and Starlette decodes header bytes as latin-1.
        if not secrets.compare_digest(key.encode("latin-1"), expected):
            raise HTTPException(403, detail="invalid API key")

    def require_api_key(key: str | None = Security(key_header)) -> None:
        _check(key, predict_key)

    def require_admin_key(key: str | None = Security(admin_header)) -> None:
        if admin_key is None and not policy.admin_open:
            raise HTTPException(
                403, detail="admin API disabled: set ADMIN_API_KEY (or ADMIN_API_KEY_FILE) on the server"
            )
        _check(key, admin_key)

    authenticated = [Depends(require_api_key)]
    admin_only = [Depends(require_admin_key)]

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets the request id to quote, never the traceback.
        request_id = getattr(request.state, "request_id", "")
        log.error("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id, exc_info=error)
        return JSONResponse({"detail": f"internal error (request {request_id})"}, status_code=500)

    @app.get("/health", response_model=Status, tags=["probes"])
    def health() -> Status:
        """Liveness: the process answers. Open."""
        return Status(status="ok")

    @app.get("/ready", response_model=Status, tags=["probes"], responses={503: {"model": Status}})
    def ready() -> Any:
        """Readiness: a model is loaded (503 with the reason until then). Open."""
        handle = store.current
        if handle is None:
            return JSONResponse(
                Status(status="not ready", detail=store.not_ready_reason()).model_dump(), status_code=503
            )
        return Status(status="ready", model_version=handle.version)

    @app.get("/metrics", tags=["probes"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus_metrics() -> Response:
        """Prometheus metrics. Open."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/model",
        response_model=ModelInfo,
        dependencies=authenticated,
        responses={**_AUTH_RESPONSES, **_NO_MODEL_RESPONSE},
        tags=["model"],
    )
    def model_info() -> ModelInfo:
        """The model being served: version, alias, MLflow run and training-data hash."""
        handle = scorer.require_model()
        return ModelInfo(
            model_name=handle.name,
            model_version=handle.version,
            alias=handle.alias,
            run_id=handle.run_id,
            training_data_sha256=handle.training_data_sha256,
            loaded_at=handle.loaded_at.isoformat(),
        )

    # The fast lane: authenticated, well-formed JSON is decoded by msgspec and answered
    # directly; everything else (and any body msgspec refuses) takes FastAPI's declared path.
    def fast_lane_body(request: Request) -> bool:
        return decoder is not None and _is_json(request)

    async def fast_predict(request: Request) -> Response | None:
        if not fast_lane_body(request):
            return None
        row = decoder.record(await request.body())  # type: ignore[union-attr]
        if row is None:
            return None
        answer = await batcher.submit((row, request.state.request_id))
        return Response(msgspec.json.encode(answer), media_type="application/json")

    async def fast_predict_batch(request: Request) -> Response | None:
        if not fast_lane_body(request):
            return None
        # Decoding a large batch takes milliseconds: with the scoring, on a worker thread, off the event loop.
        answer = await run_in_threadpool(scorer.batch_answer, decoder, await request.body(), request.state.request_id)
        if answer is None:
            return None
        return Response(answer, media_type="application/json")

    async def predict(record: record_type, request: Request) -> Prediction:  # type: ignore[valid-type]
        """Score one record."""
        answer = await batcher.submit((scorer.row_of(record), request.state.request_id))
        return Prediction(**msgspec.structs.asdict(answer))

    def predict_batch(batch: batch_type, request: Request) -> BatchPrediction:  # type: ignore[valid-type]
        """Score up to MAX_BATCH_SIZE records; predictions come back in request order."""
        request_id = request.state.request_id
        rows = [scorer.row_of(record) for record in batch.records]  # type: ignore[attr-defined]
        handle, labels, probabilities = scorer.score(rows, IndexedIds(request_id, len(rows)))
        predictions = [
            Prediction(
                label=label,
                probability=probability,
                model_name=handle.name,
                model_version=handle.version,
                request_id=f"{request_id}:{i}",
            )
            for i, (label, probability) in enumerate(zip(labels, probabilities, strict=True))
        ]
        return BatchPrediction(predictions=predictions, model_version=handle.version, request_id=request_id)

    scoring_responses = {**_UNREADABLE_BODY_RESPONSE, **_AUTH_RESPONSES, **_NO_MODEL_RESPONSE}
    for path, endpoint, fast, response_model in (
        ("/predict", predict, fast_predict, Prediction),
        ("/predict/batch", predict_batch, fast_predict_batch, BatchPrediction),
    ):
        app.router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=response_model,
            dependencies=authenticated,
            responses=scoring_responses,
            tags=["predict"],
            route_class_override=_with_fast_lane(fast),
        )

    @app.post(
        "/admin/reload",
        response_model=ReloadResult,
        dependencies=admin_only,
        responses={
            **_ADMIN_RESPONSES,
            503: {"model": ErrorDetail, "description": "Reload failed; the old model serves on."},
        },
        tags=["admin"],
    )
    async def reload_model() -> ReloadResult:
        """Resolve the alias now and serve the version it points at (no-op when unchanged). Admin key."""
        running = store.begin_reload()
        if running is None:
            raise HTTPException(
                409,
                detail=f"a load of {store.model_name} is running; retry when it is done",
                headers={"Retry-After": "1"},
            )
        try:
            # Awaited, not joined: the load runs on the store's own thread, no worker thread waits for it.
            old, new = await asyncio.wrap_future(running)
        except ModelUnavailable as err:
            serving = store.current.version if store.current else "nothing"
            raise HTTPException(503, detail=f"reload failed, still serving {serving}: {err}") from err
        return ReloadResult(old_version=old, new_version=new, reloaded=old != new)

    return app


class _PredictionBody(msgspec.Struct):
    """JSON body of a ``Prediction`` (same fields, same order), encoded without pydantic."""

    label: Any
    probability: float
    model_name: str
    model_version: str
    request_id: str


class _BatchBody(msgspec.Struct):
    """JSON body of a ``BatchPrediction``."""

    predictions: list[_PredictionBody]
    model_version: str
    request_id: str


class _Scorer:
    """Turns validated rows into predictions and prediction-log records."""

    def __init__(
        self, spec: DatasetSpec, store: ModelStore, prediction_log: PredictionLog | None, metrics: _Metrics
    ) -> None:
        self.spec = spec
        self.store = store
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.feature_names = spec.feature_names
        self.columns = list(spec.features)
        self.encoder = RecordEncoder(self.feature_names, [c.name for c in spec.features if c.is_integer])

    def require_model(self) -> ModelHandle:
        handle = self.store.current
        if handle is None:
            reason = self.store.last_error or "still loading"
            raise HTTPException(503, detail=f"no model loaded ({reason}); retry when /ready answers 200")
        return handle

    def row_of(self, record: Any) -> tuple[Any, ...]:
        """A validated pydantic record as a row: its values in the spec's feature order."""
        values = record.model_dump(by_alias=True)
        return tuple(values[name] for name in self.feature_names)

    def score(
        self, rows: Any, request_ids: Sequence[str], *, each: bool = False, logged_rows: Any = None
    ) -> tuple[ModelHandle, list[Any], list[float]]:
        """Predict with the current model (read once: a concurrent reload cannot mix versions).

        Args:
            rows: Feature values in the spec's order, one tuple per record.
            request_ids: The prediction-log id of each row.
            each: Give every row the answer it would get scored alone (micro-batches of
                single-record requests); else score the rows as one batch.
            logged_rows: The rows as the prediction log writes them, when not ``rows`` itself.

        Returns:
            The model used, the labels (the spec's values) and the positive-class probabilities.

        Raises:
            HTTPException: 503 when no model is loaded or the model fails or returns a
                non-finite probability.
        """
        handle = self.require_model()
        predictor = handle.predictor or Predictor(handle.pipeline, self.columns)
        try:
            labels, probabilities = (predictor.predict_each if each else predictor.predict)(rows)
            positive = probabilities[:, handle.classes.index(self.spec.positive_class)]
        except Exception as err:
            log.exception("model %s v%s failed on %d records", handle.name, handle.version, len(rows))
            raise HTTPException(
                503, detail=f"model {handle.name} v{handle.version} failed to score the request ({type(err).__name__})"
            ) from err
        if not np.isfinite(positive).all():
            log.error("model %s v%s returned non-finite probabilities", handle.name, handle.version)
            raise HTTPException(503, detail=f"model {handle.name} v{handle.version} returned a non-finite probability")
        label_values: list[Any] = labels.tolist()
        probability_values: list[float] = positive.astype(float).tolist()
        for label, count in collections.Counter(label_values).items():
            self.metrics.predictions.labels(str(label), handle.version).inc(count)
        if self.prediction_log is not None:
            self._log(
                handle, rows if logged_rows is None else logged_rows, request_ids, label_values, probability_values
            )
        return handle, label_values, probability_values

    def answer_each(self, items: list[tuple[tuple[Any, ...], str]]) -> list[_PredictionBody]:
        """Answers to single-record requests (row, request id) scored in one micro-batch."""
        self.metrics.micro_batch_records.observe(len(items))
        request_ids = [request_id for _, request_id in items]
        handle, labels, probabilities = self.score([row for row, _ in items], request_ids, each=True)
        return [
            _PredictionBody(label, probability, handle.name, handle.version, request_id)
            for label, probability, request_id in zip(labels, probabilities, request_ids, strict=True)
        ]

    def batch_answer(self, decoder: Any, body: bytes, request_id: str) -> bytes | None:
        """The JSON answer to a batch request body, or None when the fast decoder refuses it."""
        decoded = decoder.batch(body)
        return None if decoded is None else self.batch_body(decoded.rows, request_id, decoded.records)

    def batch_body(self, rows: Any, request_id: str, logged_rows: Any = None) -> bytes:
        """The JSON answer to a batch request (scored and encoded off the event loop)."""
        ids = IndexedIds(request_id, len(rows))
        handle, labels, probabilities = self.score(rows, ids, logged_rows=logged_rows)
        name, version = handle.name, handle.version
        predictions = [
            _PredictionBody(label, probability, name, version, f"{request_id}:{i}")
            for i, (label, probability) in enumerate(zip(labels, probabilities, strict=True))
        ]
        return msgspec.json.encode(_BatchBody(predictions, handle.version, request_id))

    def _log(
        self,
        handle: ModelHandle,
        rows: Sequence[tuple[Any, ...]],
        request_ids: Sequence[str],
        labels: list[Any],
        probabilities: list[float],
    ) -> None:
        assert self.prediction_log is not None
        timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        chunk = LogChunk(self.encoder, handle.name, handle.version, timestamp, request_ids, rows, labels, probabilities)
        try:
            self.prediction_log.log_chunk(chunk)
        except LogUnavailable as err:
            # Not answered 200: a prediction the log could not keep is not given either.
            log.error("prediction log unavailable: %s", err)
            raise HTTPException(503, detail=f"prediction log unavailable: {err}", headers={"Retry-After": "2"}) from err


def _followed(settings: ServingSettings) -> str:
    return f"pinned version {settings.model_version}" if settings.model_version else f"alias @{settings.model_alias}"


_module_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # `uvicorn serving.app:app` works too, without building an app (and reading the environment) at
    # import time. Built once: the module attribute is set, so later lookups never reach here again.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _module_app_lock:
        if "app" not in globals():
            globals()["app"] = create_app()
    return globals()["app"]
