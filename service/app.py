"""The app factory: ``create_app(settings)``; start-up work runs off the event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from service.admission import Admission, queue_policy
from service.calibration import calibrate
from service.drain import Lifecycle
from service.errors import ClientError, error_response
from service.metrics import Metrics
from service.middleware import AdmissionMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware
from service.openapi import install_openapi
from service.routers import crops, embed, gallery, health, metrics, page, query
from service.routers.page import STATIC_DIR
from service.services import Services, StartupStatus, build_services
from service.settings import Settings
from service.store import StoreError

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 64 * 1024
STORE_RETRY_AFTER_S = 5
# Answered even while shutting down: the load balancer's and Prometheus' view of the drain.
PROBES = ("/healthz", "/readyz", "/metrics")
# Codes of the errors Starlette and FastAPI raise themselves.
HTTP_CODES = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} field {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _allowed_methods(request: Request, routes: Sequence[BaseRoute]) -> str:
    """Every method some route answers on this path: Starlette's own Allow names only the
    first route that matched (GET /gallery and POST /gallery are two routes)."""
    methods: set[str] = set()
    for route in routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _http_error_detail(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"nothing at {request.url.path}"
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}"
    if exc.status_code == 400:
        return f"malformed request body: {exc.detail}"
    return str(exc.detail)


def _install_error_handlers(app: FastAPI, m: Metrics, routes: Sequence[BaseRoute]) -> None:
    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        m.errors.labels(exc.kind).inc()
        return error_response(exc.status, exc.kind, exc.detail, exc.headers)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # The request needed the store (a write, or browsing the gallery) and the database
        # cannot be reached: nothing was written; queries go on from the local index.
        m.errors.labels("store_unavailable").inc()
        return error_response(503, "store_unavailable", f"gallery store unavailable, try again: {exc}",
                              {"Retry-After": str(STORE_RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        m.errors.labels("validation").inc()
        return error_response(422, "validation", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request, routes) or headers.get("Allow", "")
        m.errors.labels(code).inc()
        return error_response(exc.status_code, code, _http_error_detail(request, exc), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only real bugs reach here: everything a client can get wrong is a ClientError.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        m.errors.labels("internal").inc()
        return error_response(500, "internal", "internal server error")


async def _open_services(settings: Settings, m: Metrics, admission: Admission, status: StartupStatus) -> Services:
    """Load the model and the gallery, measure the model here, size the batches and the queue
    bound from it: the slow part of start-up, off the event loop."""
    services = await asyncio.to_thread(build_services, settings, m, status)
    calibration = await asyncio.to_thread(calibrate, services.embedder, settings.max_batch_size)
    services.batcher.max_batch_size = calibration.batch_size
    admission.configure(queue_policy(settings, calibration.batch_size, services.embedder.workers),
                        calibration.throughput)
    # What start-up built (torch, the model, the index: ~200k objects) lives as long as the
    # process; frozen, the collector's full passes skip it instead of stalling the event loop
    # ~100 ms each (the tail of every latency under load).
    await asyncio.to_thread(gc.collect)
    gc.freeze()
    return services


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    m = Metrics()
    admission = Admission(on_refuse=m.requests_shed.labels("overloaded").inc)
    m.queue_images.set_function(lambda: admission.depth)
    m.queue_limit.set_function(lambda: admission.bound or 0)
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in a worker thread so /healthz answers at once; /readyz turns 200 when done.
        async def start() -> None:
            try:
                app.state.services = await _open_services(settings, m, admission, app.state.startup)
                log.info("ready")
            except Exception as e:
                app.state.startup_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.error("start-up failed: %s", app.state.startup_error)

        task = asyncio.create_task(start())
        try:
            yield
        finally:
            app.state.startup.stopping.set()  # a start-up still waiting for the store gives up
            await asyncio.shield(task)  # the loading thread cannot be cancelled; let it finish
            if app.state.services is not None:
                # Requests in flight have finished (drain.py): finish what is queued, close the store.
                await asyncio.to_thread(app.state.services.close)
                app.state.services = None
                log.info("services closed")

    app = FastAPI(
        title="Person re-identification service",
        version="0.1.0",
        description="Embed person crops, keep a durable gallery, rank queries against it. Every error "
        'answer is `{"detail": "<what went wrong>", "code": "<machine-readable code>"}`.',
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = m
    app.state.admission = admission
    app.state.lifecycle = lifecycle
    app.state.services = None
    app.state.startup_error = None
    app.state.startup = StartupStatus()
    routers = [r.router for r in (health, metrics, embed, gallery, query, crops, page)]
    routes = [rt for r in routers for rt in r.routes]
    _install_error_handlers(app, m, routes)
    # Middleware added last is outermost: metrics and access log see every request, then
    # admission decides from the headers, then the body limit guards the reading.
    # The body may carry the images' bytes plus multipart framing and form fields.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD, metrics=m)
    app.add_middleware(AdmissionMiddleware, lifecycle=lifecycle, admission=admission, metrics=m,
                       timeout_s=settings.request_timeout_s, probes=PROBES)
    # It gets the routes to label requests answered before routing (an early 413 or 503) with
    # the route they were sent to.
    app.add_middleware(RequestMetricsMiddleware, metrics=m, routes=routes)
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    install_openapi(app, api_key_required=bool(settings.api_key))
    return app
