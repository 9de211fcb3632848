from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.admission import WaitBudget
from service.deps import get_services, get_wait_budget, require_api_key
from service.errors import documented, not_found
from service.pipeline import embed_uploads
from service.schemas import (
    STORE_INT_MAX, DuplicateItem, EnrollResponse, Entry, GalleryPage, IdentityDetail, IdentitySummary,
    validate_identity,
)
from service.services import Services
from service.store import EntryRow

router = APIRouter(prefix="/gallery", tags=["gallery"])


def _entry(row: EntryRow) -> Entry:
    return Entry(
        entry_id=row.entry_id, camera=row.camera, has_crop=row.has_crop, model_fingerprint=row.model_fingerprint,
        created_at=dt.datetime.fromtimestamp(row.created_at, dt.timezone.utc),
    )


@router.post(
    "", status_code=201, response_model=EnrollResponse, dependencies=[Depends(require_api_key)],
    responses=documented(400, 401, 413, 415, 422, 503, 504),
)
async def enroll(
    identity: Annotated[str, Form(description="1-128 printable characters, no '/'")],
    image: Annotated[list[UploadFile], File(description="one or more crops of this person")],
    services: Annotated[Services, Depends(get_services)],
    budget: Annotated[WaitBudget, Depends(get_wait_budget)],
    camera: Annotated[int | None, Form(ge=0, le=STORE_INT_MAX, description="camera number")] = None,
) -> EnrollResponse:
    """Enrol crops under an identity (created if new). All images are embedded before anything is
    written, and all entries are committed in one transaction: 201 means durably stored; any
    error (503 overloaded, 504 past the deadline included) means nothing was written. With a
    threshold in force, `likely_duplicates` names other identities the crops already match."""
    identity = validate_identity(identity)
    vectors, crops = await embed_uploads(services, image, budget, keep_crops=services.settings.store_crops)
    threshold = services.default_threshold
    duplicates = None
    if threshold is not None:  # checked before enrolling, so the new crops cannot find themselves
        found = await run_in_threadpool(services.gallery.likely_duplicates, identity, vectors, threshold.value)
        duplicates = [DuplicateItem(identity=m.identity, score=m.score, entry_id=m.entry_id) for m in found]
    rows = await run_in_threadpool(services.gallery.enroll, identity, vectors, crops, camera)
    return EnrollResponse(
        identity=identity, entries=[_entry(r) for r in rows], gallery_size=services.gallery.stats.entries,
        likely_duplicates=duplicates,
    )


@router.get("", response_model=GalleryPage, responses=documented(422, 503))
def list_identities(
    services: Annotated[Services, Depends(get_services)],
    offset: Annotated[int, Query(ge=0, le=STORE_INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> GalleryPage:
    page = services.gallery.page(offset, limit)
    stats = services.gallery.stats
    return GalleryPage(
        identities=[IdentitySummary(identity=name, entries=n) for name, n in page.identities],
        total=page.total, offset=offset, limit=limit, gallery_size=stats.entries, stale_entries=stats.stale_entries,
    )


@router.get("/{identity}", response_model=IdentityDetail, responses=documented(404, 503))
def get_identity(identity: str, services: Annotated[Services, Depends(get_services)]) -> IdentityDetail:
    rows = services.gallery.identity_entries(identity)
    if rows is None:
        raise not_found("unknown_identity", f"unknown identity {identity!r}")
    return IdentityDetail(identity=identity, entries=[_entry(r) for r in rows])


@router.delete(
    "/{identity}", status_code=204, dependencies=[Depends(require_api_key)],
    responses=documented(401, 404, 503),
)
def delete_identity(identity: str, services: Annotated[Services, Depends(get_services)]) -> Response:
    if not services.gallery.delete(identity):
        raise not_found("unknown_identity", f"unknown identity {identity!r}")
    return Response(status_code=204)
