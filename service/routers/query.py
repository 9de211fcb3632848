from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from service.admission import WaitBudget
from service.decision import decide, passes, threshold_for_query
from service.deps import get_services, get_wait_budget
from service.errors import bad_request, documented, not_found
from service.pipeline import embed_uploads
from service.schemas import MatchItem, QueryResponse
from service.services import Services
from service.tracklet import DegenerateTracklet, aggregate

router = APIRouter(prefix="/query", tags=["query"])


@dataclass(frozen=True)
class QueryParams:
    k: int
    by: Literal["identity", "entry"]
    camera: int | None
    exclude_camera: int | None
    threshold: float | None
    rerank: bool


async def query_params(  # async: a plain def dependency would cost a thread-pool round trip
    k: Annotated[int, Query(description="how many matches (1..max_k)")] = 10,
    by: Annotated[Literal["identity", "entry"], Query(description="identity: best entry per identity")] = "identity",
    camera: Annotated[int | None, Query(description="only entries from this camera")] = None,
    exclude_camera: Annotated[int | None, Query(description="drop entries from this camera")] = None,
    threshold: Annotated[
        float | None,
        Query(ge=-1, le=1, description="cosine threshold for this query; overrides REID_MATCH_THRESHOLD and the checkpoint's"),
    ] = None,
    rerank: Annotated[
        bool, Query(description="re-rank the best REID_RERANK_SHORTLIST entries with k-reciprocal neighbourhoods")
    ] = False,
) -> QueryParams:
    return QueryParams(k, by, camera, exclude_camera, threshold, rerank)


def _check_k(services: Services, params: QueryParams) -> None:
    if not 1 <= params.k <= services.settings.max_k:
        raise bad_request("bad_k", f"k must be between 1 and {services.settings.max_k}, got {params.k}")


def _check_tracklet(services: Services, crops: int, what: str) -> None:
    limit = services.settings.max_tracklet_crops
    if crops > limit:
        raise bad_request("too_many_crops", f"{crops} {what} in one query; a tracklet holds at most {limit}")


async def _search(services: Services, vectors: np.ndarray, params: QueryParams) -> QueryResponse:
    """Search with the tracklet's aggregate (one crop: its own embedding) and decide against the threshold."""
    _check_k(services, params)
    try:
        query = aggregate(vectors)
    except DegenerateTracklet as e:
        raise bad_request("degenerate_tracklet", str(e)) from None
    threshold = threshold_for_query(params.threshold, services.default_threshold)
    started = time.perf_counter()
    matches = await run_in_threadpool(
        services.gallery.search, query, params.k, by=params.by, camera=params.camera,
        exclude_camera=params.exclude_camera, rerank_shortlist=services.settings.rerank_shortlist if params.rerank else None,
    )
    services.metrics.stage_duration.labels("search").observe(time.perf_counter() - started)
    return QueryResponse(
        matches=[
            MatchItem(identity=m.identity, score=m.score, entry_id=m.entry_id, camera=m.camera, match=passes(m.score, threshold))
            for m in matches
        ],
        gallery_size=services.gallery.stats.entries, gallery_stale=services.follower.stale,
        gallery_sync_age_s=round(services.follower.sync_age(), 3),
        threshold=threshold.value if threshold else None,
        threshold_source=threshold.source if threshold else None,
        decision=decide(matches[0].score if matches else None, threshold),
        crops=len(vectors),
        reranked=params.rerank,
    )


@router.get("", response_model=QueryResponse, responses=documented(404, 422, 503))
async def query_by_id(
    embedding_id: Annotated[
        list[str], Query(description="an id from POST /embed; repeat it for a tracklet (one person's crops)")
    ],
    params: Annotated[QueryParams, Depends(query_params)],
    services: Annotated[Services, Depends(get_services)],
) -> QueryResponse:
    """Rank the gallery against embeddings from POST /embed (several: their mean), best first."""
    _check_tracklet(services, len(embedding_id), "embedding ids")
    vectors = [services.cache.get(i) for i in embedding_id]
    missing = [i for i, v in zip(embedding_id, vectors) if v is None]
    if missing:
        of = f" ({len(missing)} of {len(embedding_id)})" if len(embedding_id) > 1 else ""
        raise not_found("unknown_embedding", f"unknown or expired embedding_id {', '.join(map(repr, missing))}{of}")
    return await _search(services, np.stack(vectors), params)


@router.post("", response_model=QueryResponse, responses=documented(400, 413, 415, 422, 503, 504))
async def query_by_image(
    image: Annotated[list[UploadFile], File(description="the crop to look up; several = one person's tracklet")],
    params: Annotated[QueryParams, Depends(query_params)],
    services: Annotated[Services, Depends(get_services)],
    budget: Annotated[WaitBudget, Depends(get_wait_budget)],
) -> QueryResponse:
    """Embed the crop(s) and rank the gallery against them (several: their mean) in one round trip."""
    _check_k(services, params)  # before spending a forward pass
    _check_tracklet(services, len(image), "images")
    vectors, _ = await embed_uploads(services, image, budget)
    return await _search(services, vectors, params)
