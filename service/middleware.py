"""ASGI middleware: request metrics by route template, and the request-body size limit."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics


class BodyTooLarge(HTTPException):
    pass


class RequestMetricsMiddleware:
    """Observes reid_request_duration_seconds{route, method, status}. The route label is the
    matched template (/gallery/{identity}), never the raw path, so label sets stay bounded."""

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
            self.metrics.request_duration.labels(self._template(scope), scope["method"], str(status)).observe(
                time.perf_counter() - started
            )

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
            self.metrics.errors.labels("too_large").inc()
            body = json.dumps({"detail": detail}).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
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
