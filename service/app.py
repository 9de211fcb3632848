"""The app factory: ``create_app(settings)``; start-up work runs off the event loop."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ClientError
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from service.routers import crops, embed, gallery, health, metrics, page, query
from service.routers.page import STATIC_DIR
from service.services import StartupStatus, build_services
from service.settings import Settings
from service.store import StoreError

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 64 * 1024


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} field {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI, m: Metrics) -> None:
    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        m.errors.labels(exc.kind).inc()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # The request needed the store (a write, or browsing the gallery) and the database
        # cannot be reached: nothing was written; queries go on from the local index.
        m.errors.labels("store_unavailable").inc()
        return JSONResponse({"detail": f"gallery store unavailable, try again: {exc}"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        m.errors.labels("validation").inc()
        return JSONResponse({"detail": _describe_validation(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        m.errors.labels(kind).inc()
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only real bugs reach here: everything a client can get wrong is a ClientError.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        m.errors.labels("internal").inc()
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    m = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in a worker thread so /healthz answers at once; /readyz turns 200 when done.
        async def start() -> None:
            try:
                app.state.services = await asyncio.to_thread(build_services, settings, m, app.state.startup)
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
                app.state.services.close()
                app.state.services = None

    app = FastAPI(
        title="Person re-identification service",
        version="0.1.0",
        description="Embed person crops, keep a durable gallery, rank queries against it.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = m
    app.state.services = None
    app.state.startup_error = None
    app.state.startup = StartupStatus()
    _install_error_handlers(app, m)
    # The body may carry the images' bytes plus multipart framing and form fields.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD, metrics=m)
    routers = [r.router for r in (health, metrics, embed, gallery, query, crops, page)]
    # Added last: outermost, sees every request. It gets the routes to label requests answered
    # before routing (an early 413) with the route they were sent to.
    app.add_middleware(RequestMetricsMiddleware, metrics=m, routes=[rt for r in routers for rt in r.routes])
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app
