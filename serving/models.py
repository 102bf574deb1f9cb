"""The models one server serves: per model name a baseline and at most one release candidate.

Each ``ServedModel`` is independent of the others: its own dataset spec (request schema,
decoder, log encoder), its own ``ModelStore`` (the baseline, following its alias), its own
release, micro-batchers and prediction-log folder. Deploying, shadowing, canarying or
rolling back one model never touches another's objects.

A request is routed by its request id (``Release.canary_takes``), scored on a worker
thread, and its answer, status and latency are counted for the role that answered
(``observe``). While a shadow release runs, the baseline answers and the rows go to the
``ShadowWorker``, which scores them with the candidate afterwards: the caller never waits
for the candidate, and nothing the candidate does (fail, hang, be slow) reaches the
caller's answer.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.batching import MicroBatcher
from serving.model_store import ModelHandle, ModelStore
from serving.prediction_log import IndexedIds, LogChunk, LogUnavailable, PredictionLog, RecordEncoder
from serving.predictor import Predictor
from serving.release import BASELINE, CANARY, CANARY_MODE, SHADOW_MODE, Release
from serving.schema import batch_model, fast_decoder, record_model

if TYPE_CHECKING:
    from serving.config import ServingSettings
    from tasks.dataset_spec import DatasetSpec

log = logging.getLogger(__name__)

SHADOW = "shadow"  # the metrics' role of a shadow candidate's scoring
LOG_RETRY_AFTER_SECONDS = 2
NOT_READY_RETRY_AFTER_SECONDS = 2
SHADOW_FAILURE_LOG_INTERVAL_SECONDS = 10.0


class NonFiniteProbability(ValueError):
    """The model returned NaN or an infinite probability."""


class ScoringFailed(Exception):
    """A request could not be answered by the role it was routed to; the caller gets ``status``."""

    def __init__(
        self, role: str, version: str | None, detail: str, status: int = 503, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.role, self.version, self.detail, self.status, self.headers = role, version, detail, status, headers


class PredictionBody(msgspec.Struct):
    """JSON body of a ``schema.Prediction`` (same fields, same order), encoded without pydantic."""

    label: Any
    probability: float
    model_name: str
    model_version: str
    request_id: str


class BatchBody(msgspec.Struct):
    """JSON body of a ``schema.BatchPrediction``."""

    predictions: list[PredictionBody]
    model_version: str
    request_id: str


class Answer(NamedTuple):
    """One single-record answer and the role that gave it."""

    body: PredictionBody
    role: str


class Scored(NamedTuple):
    """What a scoring call produced."""

    role: str
    handle: ModelHandle
    labels: list[Any]
    probabilities: list[float]
    positive: np.ndarray


class ModelMetrics:
    """Prometheus metrics per model, version and role (every label from the server's own values)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        roles = ["model_name", "model_version", "role"]
        self.requests = Counter(
            "model_requests",
            "Prediction requests by model, version, role and HTTP status.",
            [*roles, "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "model_request_duration_seconds",
            "Time to score a prediction request, by model, version and role (shadow: the candidate's scoring).",
            roles,
            registry=registry,
        )
        self.predictions = Counter(
            "predictions",
            "Predictions served, by model, version, role and predicted label.",
            [*roles, "label"],
            registry=registry,
        )
        self.shadow_rows = Counter(
            "shadow_predictions",
            "Rows a shadow candidate scored, by whether its label agreed with the baseline's (agreed: true/false/failed).",
            ["model_name", "model_version", "agreed"],
            registry=registry,
        )
        self.micro_batch_records = Histogram(
            "predict_micro_batch_records",
            "Single-record requests scored together in one model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )


class ServedModel:
    """One registered model: its baseline store, its release and how its requests are scored.

    Args:
        name: Registered model name (the URL's ``{name}``, the log's folder).
        spec: The dataset spec of its requests.
        store: Its baseline.
        settings: Server settings (batch sizes, micro-batching).
        prediction_log: Where its predictions go, or None.
        metrics: The server's model metrics.
        shadow: The server's shadow worker.
    """

    def __init__(
        self,
        name: str,
        spec: DatasetSpec,
        store: ModelStore,
        settings: ServingSettings,
        prediction_log: PredictionLog | None,
        metrics: ModelMetrics,
        shadow: ShadowWorker,
    ) -> None:
        self.name = name
        self.spec = spec
        self.dataset = spec.name
        self.store = store
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.shadow = shadow
        self.feature_names = spec.feature_names
        self.record_type = record_model(spec)
        self.batch_type = batch_model(self.record_type, settings.max_batch_size)
        self.decoder = fast_decoder(spec, settings.max_batch_size)
        self.encoder = RecordEncoder(self.feature_names, [c.name for c in spec.features if c.is_integer])
        self.positive_class = spec.positive_class
        self.release: Release | None = None
        self.admin_busy = False  # a release or reload call is running (set and read on the event loop only)
        window = settings.micro_batch_window_ms / 1000
        self.batchers: dict[str, MicroBatcher[tuple[tuple[Any, ...], str], Answer]] = {
            role: MicroBatcher(
                lambda items, role=role: self.answer_each(role, items),
                max_items=settings.micro_batch_max_records,
                window_seconds=window,
            )
            for role in (BASELINE, CANARY)
        }

    # --- routing and scoring --------------------------------------------------------

    def role_for(self, request_id: str) -> str:
        """``canary`` when a canary release takes this request id, else ``baseline``."""
        release = self.release
        return CANARY if release is not None and release.canary_takes(request_id) else BASELINE

    def row_of(self, record: Any) -> tuple[Any, ...]:
        """A validated pydantic record as a row: its values in the spec's feature order."""
        values = record.model_dump(by_alias=True)
        return tuple(values[name] for name in self.feature_names)

    def require_baseline(self) -> ModelHandle:
        handle = self.store.current
        if handle is None:
            reason = self.store.not_ready_reason() or "still loading"
            raise ScoringFailed(
                BASELINE,
                None,
                f"no model loaded ({reason}); retry when /ready answers 200",
                headers={"Retry-After": str(NOT_READY_RETRY_AFTER_SECONDS)},
            )
        return handle

    def score(
        self, role: str, rows: Any, request_ids: Sequence[str], *, each: bool = False, logged_rows: Any = None
    ) -> Scored:
        """Score rows with the role's model (read once: a concurrent reload or release cannot mix versions).

        A canary request whose release ended meanwhile is answered by the baseline.

        Args:
            role: ``baseline`` or ``canary``.
            rows: Feature values in the spec's order (tuples or a float matrix).
            request_ids: The prediction-log id of each row.
            each: Give every row the answer it would get scored alone (micro-batches).
            logged_rows: The rows as the prediction log writes them, when not ``rows`` itself.

        Raises:
            ScoringFailed: No model, the model failed or returned a non-finite probability
                (503), or the prediction log cannot take the records (503, Retry-After).
        """
        release = self.release
        candidate = release.candidate if release is not None and release.running else None
        if role == CANARY and candidate is not None and release is not None and release.mode == CANARY_MODE:
            handle, fault = candidate, release.fault
        else:
            role, handle, fault = BASELINE, self.require_baseline(), None
        try:
            if fault is not None:
                fault.apply()
            labels, positive = self._predict(handle, rows, each)
        except NonFiniteProbability as err:
            raise ScoringFailed(
                role, handle.version, f"model {handle.name} v{handle.version} returned a non-finite probability"
            ) from err
        except Exception as err:
            log.exception("model %s v%s (%s) failed on %d records", handle.name, handle.version, role, len(rows))
            raise ScoringFailed(
                role,
                handle.version,
                f"model {handle.name} v{handle.version} failed to score the request ({type(err).__name__})",
            ) from err
        label_values: list[Any] = labels.tolist()
        probability_values: list[float] = positive.tolist()
        predictions = self.metrics.predictions
        for label, count in collections.Counter(label_values).items():
            predictions.labels(self.name, handle.version, role, str(label)).inc(count)
        shadowing = release if role == BASELINE and candidate is not None and release.mode == SHADOW_MODE else None
        self._log_and_shadow(
            release, shadowing, role, handle, rows, request_ids, label_values, probability_values, each, logged_rows
        )
        return Scored(role, handle, label_values, probability_values, positive)

    def _predict(self, handle: ModelHandle, rows: Any, each: bool) -> tuple[np.ndarray, np.ndarray]:
        predictor = handle.predictor or Predictor(handle.pipeline, self.spec.features)
        labels, probabilities = (predictor.predict_each if each else predictor.predict)(rows)
        positive = np.asarray(probabilities[:, handle.classes.index(self.positive_class)], dtype=np.float64)
        if not np.isfinite(positive).all():
            log.error("model %s v%s returned non-finite probabilities", handle.name, handle.version)
            raise NonFiniteProbability(f"model {handle.name} v{handle.version} returned a non-finite probability")
        return labels, positive

    def _log_and_shadow(
        self,
        release: Release | None,
        shadowing: Release | None,
        role: str,
        handle: ModelHandle,
        rows: Any,
        request_ids: Sequence[str],
        labels: list[Any],
        probabilities: list[float],
        each: bool,
        logged_rows: Any,
    ) -> None:
        shadowed = shadowing is not None and self.shadow.reserve(len(rows))
        if shadowing is not None and not shadowed:
            shadowing.skip_shadow(len(rows))
        chunk = None
        if self.prediction_log is not None:
            timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            logged = rows if logged_rows is None else logged_rows
            chunk = LogChunk(
                self.encoder, self.name, handle.version, timestamp, request_ids, logged, labels, probabilities
            )
            if release is not None and release.running:
                chunk.role = role
                if shadowing is not None:
                    chunk.shadow_version = shadowing.candidate_version
            try:
                self.prediction_log.log_chunk(chunk, shadow_pending=shadowed)
            except LogUnavailable as err:
                if shadowed:
                    self.shadow.unreserve(len(rows))
                # Not answered 200: a prediction the log could not keep is not given either.
                log.error("prediction log unavailable: %s", err)
                raise ScoringFailed(
                    role,
                    handle.version,
                    f"prediction log unavailable: {err}",
                    headers={"Retry-After": str(LOG_RETRY_AFTER_SECONDS)},
                ) from err
        if shadowed and shadowing is not None:
            self.shadow.submit(ShadowJob(self, shadowing, rows, labels, each, chunk))

    def answer_each(self, role: str, items: list[tuple[tuple[Any, ...], str]]) -> list[Answer]:
        """Answers to single-record requests (row, request id) scored in one micro-batch."""
        self.metrics.micro_batch_records.observe(len(items))
        request_ids = [request_id for _, request_id in items]
        scored = self.score(role, [row for row, _ in items], request_ids, each=True)
        name, version = self.name, scored.handle.version
        return [
            Answer(PredictionBody(label, probability, name, version, request_id), scored.role)
            for label, probability, request_id in zip(scored.labels, scored.probabilities, request_ids, strict=True)
        ]

    def batch_answer(self, role: str, rows: Any, request_id: str, logged_rows: Any = None) -> tuple[bytes, Scored]:
        """The JSON answer to a batch request, scored and encoded on a worker thread."""
        ids = IndexedIds(request_id, len(rows))
        scored = self.score(role, rows, ids, logged_rows=logged_rows)
        name, version = self.name, scored.handle.version
        # map() over the columns: the answer's 10,000 structs built without a Python-level loop body.
        predictions = list(map(PredictionBody, scored.labels, scored.probabilities, repeat(name), repeat(version), ids))
        return msgspec.json.encode(BatchBody(predictions, version, request_id)), scored

    def observe(self, role: str, version: str | None, status: int, seconds: float, positive: Any = ()) -> None:
        """Count one answered request for the role (release counters and Prometheus)."""
        release = self.release
        if release is not None and release.running:
            release.observe(role, status, seconds, positive)
        version_label = version or "none"
        self.metrics.requests.labels(self.name, version_label, role, str(status)).inc()
        self.metrics.latency.labels(self.name, version_label, role).observe(seconds)

    # --- release control ------------------------------------------------------------

    def load_candidate(self, version: str) -> Future[ModelHandle]:
        """Load a version on its own thread (the admin call awaits it without holding a worker thread)."""
        return run_on_own_thread(lambda: self.store.load(version), f"candidate-{self.name}-{version}")

    def summary(self) -> dict[str, Any]:
        """What ``GET /models`` says of this model."""
        handle = self.store.current
        release = self.release
        running = release is not None and release.running
        return {
            "model_name": self.name,
            "dataset": self.dataset,
            "model_version": handle.version if handle else None,
            "alias": self.store.alias,
            "ready": handle is not None,
            "release": None
            if not running or release is None
            else {"mode": release.mode, "candidate_version": release.candidate_version, "weight": release.weight},
        }

    def release_report(self) -> dict[str, Any]:
        """The release JSON: routing, versions and the counters per role since the release started."""
        baseline = self.store.current
        release = self.release
        report: dict[str, Any] = {
            "model_name": self.name,
            "baseline_version_now": baseline.version if baseline else None,
        }
        if release is None:
            return {**report, "state": "none", "mode": None, "weight": 0.0, "candidate_version": None}
        return {**report, **release.report()}


class ServedModels:
    """The server's models by name; the first configured one is the default (``/predict``)."""

    def __init__(self, default: str) -> None:
        self.default_name = default
        self._models: dict[str, ServedModel] = {}
        self.configured: set[str] = set()  # the ones /ready waits for
        self.admin_busy = False  # a PUT /admin/models call is running (event loop only)

    def add(self, model: ServedModel, *, configured: bool = False) -> None:
        self._models[model.name] = model
        if configured:
            self.configured.add(model.name)

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    @property
    def default(self) -> ServedModel:
        return self._models[self.default_name]

    def __iter__(self):  # noqa: ANN204 - an iterator of ServedModel
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def not_ready(self) -> dict[str, str]:
        """The configured models not serving yet, with the reason of each."""
        reasons = {}
        for name in sorted(self.configured):
            model = self._models[name]
            reason = model.store.not_ready_reason()
            if reason is not None:
                reasons[name] = reason
        return reasons


class ShadowJob:
    """Rows a baseline answered, to be scored by the release's candidate."""

    def __init__(
        self, model: ServedModel, release: Release, rows: Any, labels: list[Any], each: bool, chunk: LogChunk | None
    ) -> None:
        self.model, self.release, self.rows, self.labels, self.each, self.chunk = (
            model,
            release,
            rows,
            labels,
            each,
            chunk,
        )

    def __len__(self) -> int:
        return len(self.rows)


class ShadowWorker:
    """One thread scoring shadow jobs in order; at most ``max_pending_rows`` rows wait (the rest are skipped, counted).

    Its own thread rather than the request worker pool: however slow a candidate is, it
    takes no thread a request needs.
    """

    def __init__(self, metrics: ModelMetrics, prediction_log: PredictionLog | None, max_pending_rows: int) -> None:
        self.metrics = metrics
        self.prediction_log = prediction_log
        self.max_pending_rows = max_pending_rows
        self._jobs: collections.deque[ShadowJob] = collections.deque()
        self._condition = threading.Condition()
        self._pending_rows = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_failure_log = 0.0

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
            self._thread.start()

    def reserve(self, rows: int) -> bool:
        """Room for ``rows`` more rows (taken now), False when too many already wait."""
        with self._condition:
            if self._stopping or self._pending_rows + rows > self.max_pending_rows:
                return False
            self._pending_rows += rows
            return True

    def unreserve(self, rows: int) -> None:
        with self._condition:
            self._pending_rows -= rows

    def submit(self, job: ShadowJob) -> None:
        with self._condition:
            self._jobs.append(job)
            self._condition.notify()

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def close(self, timeout: float = 10.0) -> None:
        """Score what waits (up to ``timeout``), then stop; jobs left complete their records without shadow answers."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
            self._condition.wait_for(lambda: not self._jobs and not self._pending_rows, timeout)
            left, self._jobs = list(self._jobs), collections.deque()
            self._condition.notify_all()
        for job in left:
            self._resolve(job, None, None)
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._jobs or self._stopping)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                self._score(job)
            except Exception:  # never let the worker die: the next job may be fine
                log.exception("shadow scoring of %s failed unexpectedly", job.model.name)
                self._resolve(job, None, None)
            finally:
                with self._condition:
                    self._pending_rows -= len(job)
                    self._condition.notify_all()

    def _score(self, job: ShadowJob) -> None:
        release, model = job.release, job.model
        candidate = release.candidate
        if candidate is None:  # the release ended before its turn came
            self._resolve(job, None, None)
            return
        started = time.perf_counter()
        try:
            if release.fault is not None:
                release.fault.apply()
            labels, positive = model._predict(candidate, job.rows, job.each)
        except Exception as err:  # the candidate's failure is counted, never the caller's
            seconds = time.perf_counter() - started
            release.observe_shadow(len(job), 0, seconds, None, failed=True)
            self.metrics.shadow_rows.labels(model.name, candidate.version, "failed").inc(len(job))
            self.metrics.latency.labels(model.name, candidate.version, SHADOW).observe(seconds)
            now = time.monotonic()
            if now - self._last_failure_log >= SHADOW_FAILURE_LOG_INTERVAL_SECONDS:
                self._last_failure_log = now
                log.warning(
                    "shadow candidate %s v%s failed: %s: %s", model.name, candidate.version, type(err).__name__, err
                )
            self._resolve(job, None, None)
            return
        seconds = time.perf_counter() - started
        shadow_labels: list[Any] = labels.tolist()
        agreed = sum(a == b for a, b in zip(shadow_labels, job.labels, strict=True))
        release.observe_shadow(len(job), agreed, seconds, positive, failed=False)
        self.metrics.shadow_rows.labels(model.name, candidate.version, "true").inc(agreed)
        self.metrics.shadow_rows.labels(model.name, candidate.version, "false").inc(len(job) - agreed)
        self.metrics.latency.labels(model.name, candidate.version, SHADOW).observe(seconds)
        self._resolve(job, shadow_labels, positive.tolist())

    def _resolve(self, job: ShadowJob, labels: list[Any] | None, probabilities: list[float] | None) -> None:
        if job.chunk is not None and self.prediction_log is not None:
            self.prediction_log.resolve_shadow(job.chunk, labels, probabilities)


def run_on_own_thread(function: Callable[[], Any], name: str) -> Future[Any]:
    """Run ``function`` on a new daemon thread; its result (or exception) in the returned future."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as err:  # handed to the waiting request
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
