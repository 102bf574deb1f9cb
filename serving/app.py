"""The model server: FastAPI app serving registered models, each with a baseline and an optional release.

Run it with ``uvicorn serving.app:create_app --factory`` (or ``python -m serving``);
settings come from the environment (see ``serving.config``).

Endpoints:

* open: ``GET /health`` (liveness), ``GET /ready`` (every configured model loaded, else 503
  with the reasons), ``GET /metrics`` (Prometheus);
* predict key (``X-API-Key``): ``POST /models/{name}/predict``, ``POST /models/{name}/predict/batch``,
  ``GET /models/{name}``, ``GET /models``, and for the default model (the first configured)
  ``POST /predict``, ``POST /predict/batch``, ``GET /model``;
* admin key: ``PUT /admin/models/{name}`` (serve one more model), ``POST /admin/reload`` (the
  default model) and ``/admin/models/{name}/reload``, and the release control
  ``POST /admin/models/{name}/release`` (``/abort``, ``/complete``), ``GET /admin/models/{name}/release``.

Everything a request passes before its body is read (keys, limits, back-pressure) is
``serving.edge``; how a model's requests are routed and scored is ``serving.models``.
"""

# No `from __future__ import annotations` in this module: FastAPI reads the request-body
# types of the endpoints from their annotations, and those types are generated at run time
# from the dataset spec inside create_app, where string annotations could not be resolved.

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError, create_model

from serving.config import MODEL_NAME_PATTERN, ServingSettings
from serving.edge import API_KEY_HEADER, Edge, EdgeMetrics, EdgePolicy
from serving.model_store import ModelNotFound, ModelStore, ModelUnavailable, StoreBusy
from serving.models import ModelMetrics, ScoringFailed, ServedModel, ServedModels, ShadowWorker
from serving.prediction_log import PredictionLog
from serving.release import CANARY_MODE, Fault, Release
from serving.schema import (
    BatchPrediction,
    ErrorDetail,
    ModelConfig,
    ModelDetail,
    ModelInfo,
    ModelList,
    Prediction,
    ReleaseRequest,
    ReloadResult,
    Status,
)
from tasks.dataset_spec import DATASETS_DIR, SpecError, load_spec

log = logging.getLogger(__name__)

SHADOW_CLOSE_TIMEOUT_SECONDS = 5.0
_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "The X-API-Key header is missing."},
    403: {"model": ErrorDetail, "description": "The X-API-Key header is wrong."},
}
_NO_MODEL_RESPONSE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "No model is loaded, or the model failed."},
}
_UNKNOWN_MODEL_RESPONSE: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No model of that name is served."},
}
_UNREADABLE_BODY_RESPONSE: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The body cannot be decoded (e.g. not UTF-8)."},
}
_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "The X-API-Key header is missing."},
    403: {"model": ErrorDetail, "description": "The X-API-Key header is not the admin key (or the server has none)."},
    409: {"model": ErrorDetail, "description": "Another load or release call of this model is running (Retry-After)."},
}
# Model names go into URL paths, S3 keys and metric labels (serving.config): the schema says so.
ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN.pattern, description="Registered model name.")]
_JSON_OBJECT = {"type": "object", "description": "A record: every feature of the model's dataset spec."}
_GENERIC_RECORD_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": _JSON_OBJECT}}}}
_GENERIC_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["records"],
                    "properties": {"records": {"type": "array", "items": _JSON_OBJECT, "minItems": 1}},
                }
            }
        },
    }
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
    """Metrics read at scrape time from the models, the log and the shadow worker, so they are never stale."""

    def __init__(self, models: ServedModels, prediction_log: PredictionLog | None, shadow: ShadowWorker) -> None:
        self.models = models
        self.prediction_log = prediction_log
        self.shadow = shadow

    def collect(self) -> Iterable[Any]:
        info = GaugeMetricFamily(
            "model_info",
            "The versions being served (value 1): the baseline, and a running release's candidate (role canary or shadow).",
            labels=["model_name", "model_version", "alias", "role"],
        )
        loaded = GaugeMetricFamily(
            "model_loaded", "1 when the model's baseline is loaded and served.", labels=["model_name"]
        )
        for model in self.models:
            handle, release = model.store.current, model.release
            if handle is not None:
                info.add_metric([model.name, handle.version, handle.alias or "", "baseline"], 1.0)
            if release is not None and release.running:
                role = "canary" if release.mode == CANARY_MODE else "shadow"
                info.add_metric([model.name, release.candidate_version, "", role], 1.0)
            loaded.add_metric([model.name], float(handle is not None))
        yield info
        yield loaded
        yield GaugeMetricFamily(
            "shadow_pending_rows", "Rows waiting for a shadow candidate to score them.", value=self.shadow.pending_rows
        )
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


FastHandler = Callable[[Request], Awaitable[Response | None]]


def _with_fast_lane(fast: FastHandler) -> type[APIRoute]:
    """A route class trying ``fast`` first and falling back to FastAPI's own handling.

    ``fast`` answers the requests it fully understands (valid JSON) and returns None for
    anything else, which FastAPI then handles as declared (422 naming the field, ...), so
    the OpenAPI schema and every error stay FastAPI's.
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


def _validated(model: type[BaseModel], body: bytes) -> Any:
    """``body`` validated by a generated request model; a 422 in FastAPI's own format otherwise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in err.errors(include_url=False)]
        ) from err


def _busy(what: str) -> HTTPException:
    return HTTPException(409, detail=f"{what}; retry when it is done", headers={"Retry-After": "1"})


def create_app(
    settings: ServingSettings | None = None,
    *,
    store: ModelStore | None = None,
    prediction_log: PredictionLog | None = None,
) -> FastAPI:
    """Build the model server.

    Args:
        settings: Configuration; read from the environment when omitted.
        store: Baseline store of the default model; built from ``settings`` when omitted.
        prediction_log: Where predictions are logged; built from ``settings`` when omitted
            (none when ``settings.prediction_log_bucket`` is empty).

    Returns:
        The app. Its lifespan starts the prediction log (taking over its spool) and the
        models' loads in the background; at shutdown it lets the shadow worker finish and
        writes what the log still holds.

    Raises:
        ConfigError: The environment is invalid (e.g. no API key).
        SpecError: A dataset spec cannot be loaded.
    """
    if settings is None:
        settings = ServingSettings.from_env()
    if prediction_log is None and settings.prediction_log_enabled:
        prediction_log = PredictionLog.from_settings(settings)
    registry = CollectorRegistry()
    edge_metrics, model_metrics = EdgeMetrics(registry), ModelMetrics(registry)
    shadow = ShadowWorker(model_metrics, prediction_log, settings.shadow_max_pending_rows)
    models = ServedModels(settings.default_model)

    def served_model(
        name: str, dataset: str, alias: str, version: str | None, given: ModelStore | None = None
    ) -> ServedModel:
        spec = load_spec(dataset)
        model_store = given or ModelStore.from_settings(settings, spec, model_name=name, alias=alias, version=version)
        return ServedModel(name, spec, model_store, settings, prediction_log, model_metrics, shadow)

    for index, entry in enumerate(settings.models):
        given = store if index == 0 else None
        # MODEL_VERSION pins the default model only (from_settings); the others follow MODEL_ALIAS.
        models.add(served_model(entry.name, entry.dataset, settings.model_alias, None, given), configured=True)
    default = models.default
    registry.register(_ServingCollector(models, prediction_log, shadow))
    body_limit = [settings.body_limit([model.feature_names for model in models])]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The spool (if any) is taken over first: a folder that cannot be used fails the start.
        if prediction_log is not None:
            await run_in_threadpool(prediction_log.start)
        shadow.start()
        # The models load in the background: the server listens at once, /ready says when they serve.
        for model in models:
            model.store.start()
        try:
            yield
        finally:
            for model in models:
                for batcher in model.batchers.values():
                    await batcher.aclose()
            await run_in_threadpool(shadow.close, SHADOW_CLOSE_TIMEOUT_SECONDS)
            for model in models:
                await run_in_threadpool(model.store.stop)
            if prediction_log is not None:
                await run_in_threadpool(prediction_log.close, settings.prediction_log_close_timeout_seconds)

    names = ", ".join(entry.name for entry in settings.models)
    app = FastAPI(
        title="Network security model server",
        version="1.1.0",
        description=f"Serves {names} (default {default.name}, {_followed(settings)}).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.spec = default.spec
    app.state.store = default.store
    app.state.models = models
    app.state.prediction_log = prediction_log
    app.state.metrics_registry = registry
    app.state.batcher = default.batchers["baseline"]
    app.state.shadow = shadow

    predict_key = settings.api_key.encode() if settings.api_key else None
    admin_key = settings.admin_api_key.encode() if settings.admin_api_key else None
    policy = EdgePolicy(
        predict_key=predict_key,
        admin_key=admin_key,
        admin_open=predict_key is None and admin_key is None,
        body_limit=lambda: body_limit[0],
        max_concurrent=settings.max_concurrent_requests,
        backlog_reason=prediction_log.backlog_reason if prediction_log is not None else lambda: None,
    )
    app.add_middleware(Edge, policy=policy, metrics=edge_metrics)
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

    def served(name: str) -> ServedModel:
        model = models.get(name)
        if model is None:
            raise HTTPException(404, detail=f"no model named {name!r} is served; GET /models lists them")
        return model

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets the request id to quote, never the traceback.
        request_id = getattr(request.state, "request_id", "")
        log.error("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id, exc_info=error)
        return JSONResponse({"detail": f"internal error (request {request_id})"}, status_code=500)

    # --- probes ---------------------------------------------------------------------

    @app.get("/health", response_model=Status, tags=["probes"])
    def health() -> Status:
        """Liveness: the process answers. Open."""
        return Status(status="ok")

    @app.get(
        "/ready",
        response_model=Status,
        response_model_exclude_none=True,
        tags=["probes"],
        responses={503: {"model": Status}},
    )
    def ready() -> Any:
        """Readiness: every configured model is loaded (503 with the reasons until then). Open."""
        versions = {model.name: (model.store.current.version if model.store.current else None) for model in models}
        waiting = models.not_ready()
        current = default.store.current
        if waiting:
            detail = "; ".join(f"{name}: {reason}" for name, reason in waiting.items())
            body = Status(status="not ready", detail=detail, models=versions)
            return JSONResponse(body.model_dump(), status_code=503)
        return Status(status="ready", model_version=current.version if current else None, models=versions)

    @app.get("/metrics", tags=["probes"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus_metrics() -> Response:
        """Prometheus metrics. Open."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # --- model information ----------------------------------------------------------

    def info_of(model: ServedModel) -> dict[str, Any]:
        handle = model.store.current
        if handle is None:
            reason = model.store.not_ready_reason() or "still loading"
            raise HTTPException(503, detail=f"no model loaded ({reason}); retry when /ready answers 200")
        return {
            "model_name": handle.name,
            "model_version": handle.version,
            "alias": handle.alias,
            "run_id": handle.run_id,
            "training_data_sha256": handle.training_data_sha256,
            "loaded_at": handle.loaded_at.isoformat(),
        }

    @app.get(
        "/model",
        response_model=ModelInfo,
        dependencies=authenticated,
        responses={**_AUTH_RESPONSES, **_NO_MODEL_RESPONSE},
        tags=["model"],
    )
    def model_info() -> ModelInfo:
        """The default model being served: version, alias, MLflow run and training-data hash."""
        return ModelInfo(**info_of(default))

    @app.get("/models", response_model=ModelList, dependencies=authenticated, responses=_AUTH_RESPONSES, tags=["model"])
    def model_list() -> ModelList:
        """Every model served, its baseline version and its running release."""
        return ModelList(default=default.name, models=[model.summary() for model in models])

    @app.get(
        "/models/{name}",
        response_model=ModelDetail,
        dependencies=authenticated,
        responses={**_AUTH_RESPONSES, **_UNKNOWN_MODEL_RESPONSE, **_NO_MODEL_RESPONSE},
        tags=["model"],
    )
    def model_detail(name: ModelName) -> ModelDetail:
        """One model: its baseline (as ``GET /model``), its dataset and its running release."""
        model = served(name)
        return ModelDetail(**info_of(model), dataset=model.dataset, release=model.summary()["release"])

    # --- predictions ----------------------------------------------------------------

    async def answer_one(model: ServedModel, row: tuple[Any, ...], request_id: str) -> Response:
        routed = model.role_for(request_id)
        started = time.perf_counter()
        try:
            answer = await model.batchers[routed].submit((row, request_id))
        except ScoringFailed as err:
            model.observe(err.role, err.version, err.status, time.perf_counter() - started)
            raise HTTPException(err.status, detail=err.detail, headers=err.headers) from err
        body = answer.body
        model.observe(answer.role, body.model_version, 200, time.perf_counter() - started, (body.probability,))
        return Response(msgspec.json.encode(body), media_type="application/json")

    async def answer_batch(
        model: ServedModel, request_id: str, *, body: bytes | None = None, rows: Any = None
    ) -> Response | None:
        """The answer to a batch given as a body (None when the fast decoder refuses it) or as rows."""
        routed = model.role_for(request_id)
        decoder = model.decoder

        def work() -> Any:
            if body is None:
                return model.batch_answer(routed, rows, request_id)
            decoded = decoder.batch(body) if decoder is not None else None
            if decoded is None:
                return None
            return model.batch_answer(routed, decoded.rows, request_id, decoded.records)

        started = time.perf_counter()
        try:
            # Decoding a large batch takes milliseconds: with the scoring, on a worker thread, off the event loop.
            result = await run_in_threadpool(work)
        except ScoringFailed as err:
            model.observe(err.role, err.version, err.status, time.perf_counter() - started)
            raise HTTPException(err.status, detail=err.detail, headers=err.headers) from err
        if result is None:
            return None
        payload, scored = result
        model.observe(scored.role, scored.handle.version, 200, time.perf_counter() - started, scored.positive)
        return Response(payload, media_type="application/json")

    # The default model's routes: FastAPI's declared bodies (OpenAPI, 422 naming the field)
    # behind a fast lane that decodes well-formed JSON with msgspec.
    async def fast_predict(request: Request) -> Response | None:
        if default.decoder is None or not _is_json(request):
            return None
        row = default.decoder.record(await request.body())
        if row is None:
            return None
        return await answer_one(default, row, request.state.request_id)

    async def fast_predict_batch(request: Request) -> Response | None:
        if default.decoder is None or not _is_json(request):
            return None
        return await answer_batch(default, request.state.request_id, body=await request.body())

    async def predict(record: default.record_type, request: Request) -> Prediction:  # type: ignore[name-defined]
        """Score one record with the default model."""
        return await answer_one(default, default.row_of(record), request.state.request_id)  # type: ignore[return-value]

    async def predict_batch(batch: default.batch_type, request: Request) -> BatchPrediction:  # type: ignore[name-defined]
        """Score up to MAX_BATCH_SIZE records with the default model; predictions come back in request order."""
        rows = [default.row_of(record) for record in batch.records]  # type: ignore[attr-defined]
        return await answer_batch(default, request.state.request_id, rows=rows)  # type: ignore[return-value]

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

    model_scoring_responses = {**scoring_responses, **_UNKNOWN_MODEL_RESPONSE}

    @app.post(
        "/models/{name}/predict",
        response_model=Prediction,
        dependencies=authenticated,
        responses=model_scoring_responses,
        openapi_extra=_GENERIC_RECORD_BODY,
        tags=["predict"],
    )
    async def model_predict(name: ModelName, request: Request) -> Response:
        """Score one record with the model ``name`` (its dataset spec decides the fields)."""
        model = served(name)
        body = await request.body()
        row = model.decoder.record(body) if model.decoder is not None else None
        if row is None:
            row = model.row_of(_validated(model.record_type, body))
        return await answer_one(model, row, request.state.request_id)

    @app.post(
        "/models/{name}/predict/batch",
        response_model=BatchPrediction,
        dependencies=authenticated,
        responses=model_scoring_responses,
        openapi_extra=_GENERIC_BATCH_BODY,
        tags=["predict"],
    )
    async def model_predict_batch(name: ModelName, request: Request) -> Response:
        """Score up to MAX_BATCH_SIZE records with the model ``name``, in request order."""
        model = served(name)
        body = await request.body()
        answer = await answer_batch(model, request.state.request_id, body=body)
        if answer is not None:
            return answer
        batch = _validated(model.batch_type, body)
        rows = [model.row_of(record) for record in batch.records]
        answer = await answer_batch(model, request.state.request_id, rows=rows)
        assert answer is not None
        return answer

    # --- admin ----------------------------------------------------------------------

    async def reload(model: ServedModel) -> ReloadResult:
        running = model.store.begin_reload()
        if running is None:
            raise _busy(f"a load of {model.name} is running")
        try:
            # Awaited, not joined: the load runs on the store's own thread, no worker thread waits for it.
            old, new = await asyncio.wrap_future(running)
        except ModelUnavailable as err:
            serving = model.store.current.version if model.store.current else "nothing"
            raise HTTPException(503, detail=f"reload failed, still serving {serving}: {err}") from err
        return ReloadResult(old_version=old, new_version=new, reloaded=old != new)

    reload_responses = {
        **_ADMIN_RESPONSES,
        503: {"model": ErrorDetail, "description": "Reload failed; the old model serves on."},
    }

    @app.post(
        "/admin/reload",
        response_model=ReloadResult,
        dependencies=admin_only,
        responses=reload_responses,
        tags=["admin"],
    )
    async def reload_default() -> ReloadResult:
        """Resolve the default model's alias now and serve the version it points at (no-op when unchanged)."""
        return await reload(default)

    @app.post(
        "/admin/models/{name}/reload",
        response_model=ReloadResult,
        dependencies=admin_only,
        responses={**reload_responses, **_UNKNOWN_MODEL_RESPONSE},
        tags=["admin"],
    )
    async def reload_model(name: ModelName) -> ReloadResult:
        """Resolve the model's alias now and serve the version it points at (no-op when unchanged)."""
        return await reload(served(name))

    # The datasets a model can be served for: the specs there are (a name, never a path).
    known = tuple(sorted(path.stem for path in DATASETS_DIR.glob("*.yaml")))
    model_config_type = create_model(
        "ModelConfig",
        __base__=ModelConfig,
        dataset=(Literal[known], ...),  # type: ignore[valid-type]
    )

    @app.put(
        "/admin/models/{name}",
        response_model=ModelDetail,
        dependencies=admin_only,
        responses={
            **_ADMIN_RESPONSES,
            400: {"model": ErrorDetail, "description": "The body cannot be decoded, or its dataset spec is invalid."},
            404: {"model": ErrorDetail, "description": "The registry has no such model (or alias, or version)."},
            503: {"model": ErrorDetail, "description": "The model could not be loaded; it is not served."},
        },
        tags=["admin"],
    )
    async def put_model(name: ModelName, config: model_config_type, response: Response) -> ModelDetail:  # type: ignore[valid-type]
        """Serve one more model (idempotent): loaded before the call returns, its own routes, log and releases."""
        existing = models.get(name)
        if existing is not None:
            wanted = (config.dataset, None if config.version else config.alias, config.version)
            if (existing.dataset, existing.store.alias, existing.store.pinned_version) != wanted:
                raise HTTPException(
                    409,
                    detail=f"{name} is served with dataset {existing.dataset}, alias {existing.store.alias}, "
                    f"version {existing.store.pinned_version}; a served model is changed by a release, not a PUT",
                )
            return ModelDetail(**info_of(existing), dataset=existing.dataset, release=existing.summary()["release"])
        if models.admin_busy:
            raise _busy("another model is being added")
        models.admin_busy = True
        try:
            try:
                model = served_model(name, config.dataset, config.alias, config.version)
            except SpecError as err:
                raise HTTPException(400, detail=str(err)) from err
            loading = model.store.begin_reload()
            assert loading is not None  # a new store runs nothing yet
            try:
                await asyncio.wrap_future(loading)
            except ModelUnavailable as err:
                status = 404 if isinstance(err, ModelNotFound) else 503
                raise HTTPException(status, detail=f"{name} is not served: {err}") from err
            models.add(model)
            body_limit[0] = settings.body_limit([m.feature_names for m in models])
            model.store.start()  # polls the alias when ALIAS_POLL_SECONDS is set
        finally:
            models.admin_busy = False
        log.info("now serving %s (dataset %s) v%s", name, model.dataset, model.store.current.version)  # type: ignore[union-attr]
        response.status_code = 201
        return ModelDetail(**info_of(model), dataset=model.dataset, release=None)

    release_responses = {
        **_ADMIN_RESPONSES,
        404: {"model": ErrorDetail, "description": "No model of that name is served, or no such candidate version."},
        503: {"model": ErrorDetail, "description": "No baseline, or the candidate could not be loaded."},
    }

    @app.get(
        "/admin/models/{name}/release",
        response_model=dict[str, Any],
        dependencies=admin_only,
        responses=release_responses,
        tags=["admin"],
    )
    def release_status(name: ModelName) -> dict[str, Any]:
        """The release: mode, weight, versions, and per role since it started: requests, 5xx, p50/p99, scores."""
        return served(name).release_report()

    @app.post(
        "/admin/models/{name}/release",
        response_model=dict[str, Any],
        dependencies=admin_only,
        responses={
            **release_responses,
            **_UNREADABLE_BODY_RESPONSE,
            403: {"model": ErrorDetail, "description": "Fault injection is off (or not the admin key)."},
        },
        tags=["admin"],
    )
    async def start_release(name: ModelName, request_body: ReleaseRequest) -> dict[str, Any]:
        """Serve a candidate beside the baseline (shadow, or canary with a weight); returns once it serves.

        Repeating the same call changes nothing; another weight or mode for the same
        candidate reuses it and restarts the counters (a new canary step).
        """
        model = served(name)
        if request_body.fault is not None and not settings.fault_injection:
            raise HTTPException(403, detail="fault injection is off on this server (FAULT_INJECTION=true allows it)")
        fault = Fault(**request_body.fault.model_dump()) if request_body.fault is not None else None
        version, mode = request_body.candidate_version, request_body.mode
        weight = request_body.weight if mode == CANARY_MODE else 0.0
        baseline = model.store.current
        if baseline is None:
            raise HTTPException(503, detail=f"{name} has no baseline yet: {model.store.not_ready_reason()}")
        if version == baseline.version:
            raise HTTPException(409, detail=f"v{version} is already {name}'s baseline")
        current = model.release
        if current is not None and current.same_as(version, mode, weight, fault):
            return model.release_report()
        if model.admin_busy:
            raise _busy(f"another release call of {name} is running")
        model.admin_busy = True
        try:
            reusable = current is not None and current.running and current.candidate_version == version
            if reusable and current is not None:
                candidate = current.candidate
            else:
                try:
                    candidate = await asyncio.wrap_future(model.load_candidate(version))
                except ModelUnavailable as err:
                    status = 404 if isinstance(err, ModelNotFound) else 503
                    raise HTTPException(status, detail=f"candidate not loaded, nothing changed: {err}") from err
            model.release = Release(candidate, version, mode, weight, fault, baseline.version)
        finally:
            model.admin_busy = False
        log.info("%s: release of v%s started (%s, weight %g) beside v%s", name, version, mode, weight, baseline.version)
        return model.release_report()

    @app.post(
        "/admin/models/{name}/release/abort",
        response_model=dict[str, Any],
        dependencies=admin_only,
        responses=release_responses,
        tags=["admin"],
    )
    async def abort_release(name: ModelName) -> dict[str, Any]:
        """Drop the candidate: the baseline answers 100 % from now on (idempotent)."""
        model = served(name)
        release = model.release
        if release is not None and release.running:
            release.end("aborted")
            log.warning(
                "%s: release of v%s aborted; v%s serves alone",
                name,
                release.candidate_version,
                release.baseline_version,
            )
        return model.release_report()

    @app.post(
        "/admin/models/{name}/release/complete",
        response_model=dict[str, Any],
        dependencies=admin_only,
        responses=release_responses,
        tags=["admin"],
    )
    async def complete_release(name: ModelName) -> dict[str, Any]:
        """The candidate becomes the baseline (no reload, no dropped request), pinned until its alias points at it."""
        model = served(name)
        release = model.release
        if release is None or (not release.running and release.state != "completed"):
            raise HTTPException(409, detail=f"no release of {name} is running")
        if release.running:
            try:
                model.store.promote(release.candidate)
            except StoreBusy as err:
                raise _busy(str(err)) from err
            release.end("completed")
            log.info("%s: release completed, v%s is the baseline", name, release.candidate_version)
        return model.release_report()

    return app


def _followed(settings: ServingSettings) -> str:
    return f"pinned version {settings.model_version}" if settings.model_version else f"alias @{settings.model_alias}"


_module_app_lock = threading.Lock()


def __getattr__(name: ModelName) -> Any:
    # `uvicorn serving.app:app` works too, without building an app (and reading the environment) at
    # import time. Built once: the module attribute is set, so later lookups never reach here again.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _module_app_lock:
        if "app" not in globals():
            globals()["app"] = create_app()
    return globals()["app"]
