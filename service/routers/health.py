from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the process answers. Never waits on the model."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(request: Request):
    """Readiness: 200 once the model is loaded and the gallery indexed; 503 while starting, after a
    failed start, and from the moment a shutdown begins (a load balancer stops sending)."""
    if request.app.state.lifecycle.stopping:
        return JSONResponse(Readiness(status="stopping", detail="shutting down").model_dump(), status_code=503)
    services = request.app.state.services
    if services is None:
        error = request.app.state.startup_error
        body = Readiness(status="failed" if error else "starting", detail=error or "loading model and gallery")
        return JSONResponse(body.model_dump(), status_code=503)
    info, gallery = services.embedder.info, services.gallery
    return Readiness(
        status="ready", model=info.model_name, arch=info.arch, fingerprint=info.fingerprint,
        backend=services.embedder.backend, device=services.embedder.device, gallery_size=gallery.size,
        identities=gallery.index.identity_count, stale_entries=gallery.stale_entries,
    )
