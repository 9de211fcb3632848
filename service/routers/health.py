from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import BackendCheck, BackendTrial, Health, Readiness
from service.services import store_name

router = APIRouter(tags=["health"])

UNCALIBRATED = (
    "the checkpoint carries no calibrated threshold and REID_MATCH_THRESHOLD is unset: /query ranks without a "
    "known/unknown decision (python -m training calibrate writes one into the checkpoint)"
)


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
        body = Readiness(status="failed" if error else "starting", detail=error or request.app.state.startup.detail)
        return JSONResponse(body.model_dump(), status_code=503)
    info, stats, threshold = services.embedder.info, services.gallery.stats, services.default_threshold
    return Readiness(
        status="ready", model=info.model_name, arch=info.arch, fingerprint=info.fingerprint,
        backend=services.embedder.backend, precision=services.embedder.precision,
        backend_check=backend_check(services.embedder.check), device=services.embedder.device, gallery_size=stats.entries,
        identities=stats.identities, stale_entries=stats.stale_entries, log_position=stats.position,
        index=stats.index_kind, gallery_store=store_name(services.settings), gallery_stale=services.follower.stale,
        calibrated=info.match_threshold is not None,
        match_threshold=threshold.value if threshold else None,
        threshold_source=threshold.source if threshold else None,
        detail=None if threshold else UNCALIBRATED,
    )


def backend_check(check) -> BackendCheck | None:
    if check is None:
        return None
    return BackendCheck(
        min_cosine=check.chosen.min_cosine, required_min_cosine=check.required_min_cosine, from_cache=check.from_cache,
        trials=[BackendTrial(backend=t.backend, precision=t.precision, min_cosine=t.min_cosine,
                             images_per_s=t.images_per_s) for t in check.trials],
    )
