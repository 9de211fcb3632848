from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from service.admission import WaitBudget
from service.deps import get_services, get_wait_budget
from service.errors import bad_request, documented, not_found
from service.pipeline import embed_uploads
from service.schemas import MatchItem, QueryResponse
from service.services import Services

router = APIRouter(prefix="/query", tags=["query"])


@dataclass(frozen=True)
class QueryParams:
    k: int
    by: Literal["identity", "entry"]
    camera: int | None
    exclude_camera: int | None


async def query_params(  # async: a plain def dependency would cost a thread-pool round trip
    k: Annotated[int, Query(description="how many matches (1..max_k)")] = 10,
    by: Annotated[Literal["identity", "entry"], Query(description="identity: best entry per identity")] = "identity",
    camera: Annotated[int | None, Query(description="only entries from this camera")] = None,
    exclude_camera: Annotated[int | None, Query(description="drop entries from this camera")] = None,
) -> QueryParams:
    return QueryParams(k, by, camera, exclude_camera)


def _check_k(services: Services, params: QueryParams) -> None:
    if not 1 <= params.k <= services.settings.max_k:
        raise bad_request("bad_k", f"k must be between 1 and {services.settings.max_k}, got {params.k}")


async def _search(services: Services, vector: np.ndarray, params: QueryParams) -> QueryResponse:
    _check_k(services, params)
    started = time.perf_counter()
    matches = await run_in_threadpool(
        services.gallery.search, vector, params.k, by=params.by, camera=params.camera,
        exclude_camera=params.exclude_camera,
    )
    services.metrics.stage_duration.labels("search").observe(time.perf_counter() - started)
    return QueryResponse(
        matches=[MatchItem(identity=m.identity, score=m.score, entry_id=m.entry_id, camera=m.camera) for m in matches],
        gallery_size=services.gallery.size,
    )


@router.get("", response_model=QueryResponse, responses=documented(404, 422, 503))
async def query_by_id(
    embedding_id: Annotated[str, Query(description="an id from POST /embed")],
    params: Annotated[QueryParams, Depends(query_params)],
    services: Annotated[Services, Depends(get_services)],
) -> QueryResponse:
    """Rank the gallery against an embedding from POST /embed, best first."""
    vector = services.cache.get(embedding_id)
    if vector is None:
        raise not_found("unknown_embedding", f"unknown or expired embedding_id {embedding_id!r}")
    return await _search(services, vector, params)


@router.post("", response_model=QueryResponse, responses=documented(400, 413, 415, 422, 503, 504))
async def query_by_image(
    image: Annotated[UploadFile, File(description="the crop to look up")],
    params: Annotated[QueryParams, Depends(query_params)],
    services: Annotated[Services, Depends(get_services)],
    budget: Annotated[WaitBudget, Depends(get_wait_budget)],
) -> QueryResponse:
    """Embed a crop and rank the gallery against it in one round trip."""
    _check_k(services, params)  # before spending a forward pass
    vectors, _ = await embed_uploads(services, [image], budget)
    return await _search(services, vectors[0], params)
