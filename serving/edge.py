"""The server's edge: what every request goes through before the app reads a byte of its body.

One plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` runs every request through
an extra task and memory streams, which costs more than scoring a record), in this order:

1. the request id: the caller's ``X-Request-ID`` when it is tame, else a new one; echoed
   in the answer;
2. the route: the path is matched against the server's fixed route templates, which give
   the metrics their ``endpoint`` label (an unknown path is ``unmatched``: no label ever
   comes from what a caller sends) and say which key the route needs;
3. the key, from the headers only: the predict key (``API_KEY``) for predictions and model
   information, the admin key (``ADMIN_API_KEY``) for every ``/admin/*`` route; 401/403
   before the body is read, so an unauthenticated upload costs nothing;
4. admission: at most ``max_concurrent`` non-probe requests at once, and predictions only
   while the prediction log keeps up (its back-pressure); else 503 with ``Retry-After``,
   counted in ``http_requests_shed_total``;
5. the body cap: a ``Content-Length`` above the limit is 413 at once; a body sent without
   one is counted as it arrives and cut off with 413 once past the limit; otherwise the
   body is read here (bounded) and handed to the app as one message.

An answer given before the whole body was received closes the connection, so nothing
keeps reading (and discarding) an oversized upload. The probes (``/health``, ``/ready``,
``/metrics``) and the API documentation are never limited or authenticated.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-ID"
_API_KEY = API_KEY_HEADER.lower().encode()
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
_CONTENT_LENGTH = b"content-length"
# A caller's request id is reused (to trace a call through a gateway) only when it is this tame.
CALLER_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BUSY_RETRY_AFTER_SECONDS = 1
BACKLOG_RETRY_AFTER_SECONDS = 2
# The methods the metrics name; any other token a client sends is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

OPEN, PREDICT, READ, ADMIN = "open", "predict", "read", "admin"
_NAME = r"[^/]+"
# (path pattern, endpoint label, what the route needs). Kept in step with the app's routes
# (tests/serving checks every route of the app has its template here).
ROUTES: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(f"^{pattern}$"), label, kind)
    for pattern, label, kind in (
        ("/health", "/health", OPEN),
        ("/ready", "/ready", OPEN),
        ("/metrics", "/metrics", OPEN),
        ("/openapi.json", "/openapi.json", OPEN),
        ("/docs", "/docs", OPEN),
        ("/docs/oauth2-redirect", "/docs/oauth2-redirect", OPEN),
        ("/redoc", "/redoc", OPEN),
        ("/predict", "/predict", PREDICT),
        ("/predict/batch", "/predict/batch", PREDICT),
        (f"/models/{_NAME}/predict", "/models/{name}/predict", PREDICT),
        (f"/models/{_NAME}/predict/batch", "/models/{name}/predict/batch", PREDICT),
        ("/model", "/model", READ),
        ("/models", "/models", READ),
        (f"/models/{_NAME}", "/models/{name}", READ),
        ("/admin/reload", "/admin/reload", ADMIN),
        (f"/admin/models/{_NAME}", "/admin/models/{name}", ADMIN),
        (f"/admin/models/{_NAME}/reload", "/admin/models/{name}/reload", ADMIN),
        (f"/admin/models/{_NAME}/release", "/admin/models/{name}/release", ADMIN),
        (f"/admin/models/{_NAME}/release/abort", "/admin/models/{name}/release/abort", ADMIN),
        (f"/admin/models/{_NAME}/release/complete", "/admin/models/{name}/release/complete", ADMIN),
    )
)
UNMATCHED = "unmatched"
_FALLBACK_ADMIN = re.compile(r"^/admin(/|$)")


def route_of(path: str) -> tuple[str, str]:
    """(endpoint label, kind) of a request path; unknown paths are ``unmatched`` (admin ones still need the admin key)."""
    for pattern, label, kind in ROUTES:
        if pattern.match(path):
            return label, kind
    return UNMATCHED, ADMIN if _FALLBACK_ADMIN.match(path) else OPEN


@dataclass(frozen=True)
class EdgePolicy:
    """What the edge enforces.

    Attributes:
        predict_key: The predict key, None when predictions are open (``ALLOW_NO_API_KEY``).
        admin_key: The admin key, None when there is none.
        admin_open: Admin routes need no key (a server without any key, local development).
        body_limit: Largest body in bytes (read at each request: models added at run time may widen it).
        max_concurrent: Non-probe requests in progress at once.
        backlog_reason: Why predictions must be refused now (the prediction log is behind), or None.
    """

    predict_key: bytes | None
    admin_key: bytes | None
    admin_open: bool
    body_limit: Callable[[], int]
    max_concurrent: int
    backlog_reason: Callable[[], str | None]


class EdgeMetrics:
    """The request metrics, every label from a fixed set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds", "Time to answer, by endpoint.", ["endpoint", "method"], registry=registry
        )
        self.shed = Counter(
            "http_requests_shed",
            "Requests answered 503 with Retry-After before any work: reason busy (MAX_CONCURRENT_REQUESTS "
            "in progress) or prediction_log_backlog (the prediction log is behind; nothing already accepted is dropped).",
            ["endpoint", "reason"],
            registry=registry,
        )


class _BodyTooLarge(Exception):
    pass


class Edge:
    """The ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: EdgePolicy, metrics: EdgeMetrics) -> None:
        self.app = app
        self.policy = policy
        self.metrics = metrics
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        caller_id = _header(headers, _REQUEST_ID)
        request_id = caller_id if caller_id and CALLER_REQUEST_ID.match(caller_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        endpoint, kind = route_of(scope["path"])
        method = scope["method"] if scope["method"] in METHODS else "other"
        started = time.perf_counter()
        status = 500
        tagged_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (_REQUEST_ID, tagged_id)]}
            await send(message)

        counted = False
        try:
            refusal = self._refusal(kind, headers, endpoint)
            if refusal is not None:
                await _answer(send_with_id, *refusal)
                return
            if kind != OPEN:
                self.in_progress += 1
                counted = True
            limit = self.policy.body_limit()
            declared = _header(headers, _CONTENT_LENGTH)
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                await _answer(send_with_id, *_too_large(limit))
                return
            try:
                body_receive = await _buffered(receive, limit)
            except _BodyTooLarge:
                await _answer(send_with_id, *_too_large(limit))
                return
            await self.app(scope, body_receive, send_with_id)
        finally:
            if counted:
                self.in_progress -= 1
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - started)

    def _refusal(self, kind: str, headers: list[tuple[bytes, bytes]], endpoint: str) -> tuple[Any, ...] | None:
        """The early answer (status, detail, extra headers, close) for a request refused before its body, or None."""
        if kind == OPEN:
            return None
        policy = self.policy
        key = _raw_header(headers, _API_KEY)
        if kind == ADMIN:
            if policy.admin_key is None and not policy.admin_open:
                return 403, "admin API disabled: set ADMIN_API_KEY (or ADMIN_API_KEY_FILE) on the server", (), True
            expected = policy.admin_key
        else:
            expected = policy.predict_key
        if expected is not None:
            if not key:
                return 401, f"missing {API_KEY_HEADER} header", (), True
            if not secrets.compare_digest(key, expected):
                return 403, "invalid API key", (), True
        if self.in_progress >= policy.max_concurrent:
            self.metrics.shed.labels(endpoint, "busy").inc()
            detail = f"server busy: {self.in_progress} requests in progress (MAX_CONCURRENT_REQUESTS); retry shortly"
            return 503, detail, ((b"retry-after", str(BUSY_RETRY_AFTER_SECONDS).encode()),), True
        if kind == PREDICT:
            reason = policy.backlog_reason()
            if reason is not None:
                self.metrics.shed.labels(endpoint, "prediction_log_backlog").inc()
                retry = ((b"retry-after", str(BACKLOG_RETRY_AFTER_SECONDS).encode()),)
                return 503, f"not accepting predictions for now: {reason}", retry, True
        return None


def _too_large(limit: int) -> tuple[Any, ...]:
    detail = f"request body larger than {limit:,} bytes (MAX_BODY_BYTES; batches hold at most MAX_BATCH_SIZE records)"
    return 413, detail, (), True


async def _buffered(receive: Receive, limit: int) -> Receive:
    """Read the whole body (at most ``limit`` bytes) and return a receive that hands it over as one message."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away: the app sees the disconnect as it would have.
            first: Message | None = message
            break
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            first = {"type": "http.request", "body": chunks[0] if len(chunks) == 1 else b"".join(chunks)}
            break
    pending: Message | None = first

    async def replay() -> Message:
        nonlocal pending
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()  # after the body: the disconnect, when it comes

    return replay


async def _answer(
    send: Send, status: int, detail: str, extra: tuple[tuple[bytes, bytes], ...] = (), close: bool = False
) -> None:
    body = msgspec.json.encode({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:
        # The body may still be arriving: closing stops the server from reading (and discarding) it.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _raw_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    value = _raw_header(headers, name)
    return None if value is None else value.decode("latin-1")
