"""ASGI middleware: request metrics and the access log, admission before the body is read,
and the request-body size limit."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import DEADLINE_KEY, Admission
from service.drain import Lifecycle
from service.errors import ClientError, error_response, retry_later
from service.metrics import Metrics

access_log = logging.getLogger("service.access")


class BodyTooLarge(HTTPException):
    """An HTTPException, because FastAPI re-raises those from form parsing (anything else
    becomes its generic 400)."""

    code = "too_large"


async def send_error(error: ClientError, metrics: Metrics, scope: Scope, receive: Receive, send: Send,
                     close: bool = False) -> None:
    """Answer from middleware, before routing, with the same body the exception handlers send."""
    metrics.errors.labels(error.kind).inc()
    headers = dict(error.headers or {})
    if close:
        headers["Connection"] = "close"
    await error_response(error.status, error.kind, error.detail, headers)(scope, receive, send)


class RequestMetricsMiddleware:
    """Observes reid_request_duration_seconds{route, method, status} and writes the access log
    line. The route label is the matched template (/gallery/{identity}), never the raw path,
    so label sets stay bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            status = 500
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = self._template(scope)
            self.metrics.request_duration.labels(route, scope["method"], str(status)).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                self._log(scope, route, status, elapsed)

    @staticmethod
    def _log(scope: Scope, route: str, status: int, elapsed: float) -> None:
        client = scope.get("client")
        fields = {
            "method": scope["method"], "path": scope["path"], "route": route, "status": status,
            "duration_ms": round(elapsed * 1000, 1), "client": f"{client[0]}:{client[1]}" if client else None,
        }
        access_log.info("%(method)s %(path)s %(status)d %(duration_ms).1f ms", fields, extra=fields)

    def _template(self, scope: Scope) -> str:
        """The matched route's template; for a request answered before routing, the route it was
        sent to. Paths no route knows share one label, so label sets stay bounded."""
        route = scope.get("route")
        if route is not None:
            return route.path
        for candidate in self.routes:
            if candidate.matches(scope)[0] != Match.NONE:
                return getattr(candidate, "path", "unmatched")
        return "unmatched"


class AdmissionMiddleware:
    """Decides from the headers alone, before a body is read:

    - shutting down: every request but the probes gets 503 ``shutting_down`` (Connection: close,
      so the client reconnects elsewhere);
    - an upload (a multipart POST: the requests that carry images) while the images already
      waiting for the model fill the bound: 503 ``overloaded`` with Retry-After, body unread;
    - otherwise the request gets its deadline and is counted in flight (the drain waits for it).
    """

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, admission: Admission, metrics: Metrics,
                 timeout_s: float, probes: Collection[str]):
        self.app, self.lifecycle, self.admission, self.metrics = app, lifecycle, admission, metrics
        self.timeout_s, self.probes = timeout_s, frozenset(probes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.refusing and scope["path"] not in self.probes:
            self.metrics.requests_shed.labels("shutting_down").inc()
            error = retry_later("shutting_down", "the service is shutting down; retry (another replica)", 1)
            await send_error(error, self.metrics, scope, receive, send, close=True)
            return
        if self.admission.full and _is_upload(scope):
            await send_error(self.admission.refuse(), self.metrics, scope, receive, send)
            return
        scope[DEADLINE_KEY] = time.monotonic() + self.timeout_s
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


def _is_upload(scope: Scope) -> bool:
    if scope["method"] != "POST":
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value[:19].lower() == b"multipart/form-data"
    return False


class BodyLimitMiddleware:
    """413 before reading a body whose Content-Length is over the limit, and while reading
    one that grows past it (chunked uploads): nothing over the limit is ever buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        detail = f"request body exceeds the limit of {self.max_bytes} bytes"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(ClientError(413, BodyTooLarge.code, detail), self.metrics, scope, receive, send, close=True)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(413, detail)
            return message

        await self.app(scope, limited_receive, send)
