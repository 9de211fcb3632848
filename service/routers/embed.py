from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Response, UploadFile

from service.admission import WaitBudget
from service.deps import get_services, get_wait_budget
from service.errors import documented
from service.pipeline import embed_uploads
from service.schemas import EmbeddingItem, EmbedResponse, unvalidated_json
from service.services import Services

router = APIRouter(tags=["embed"])


@router.post("/embed", response_model=EmbedResponse, responses=documented(400, 413, 415, 422, 503, 504))
async def embed(
    image: Annotated[list[UploadFile], File(description="one or more person crops")],
    services: Annotated[Services, Depends(get_services)],
    budget: Annotated[WaitBudget, Depends(get_wait_budget)],
) -> Response:
    """Embed crops; each id can be passed to GET /query until it expires from the cache."""
    vectors, _ = await embed_uploads(services, image, budget)
    items = [EmbeddingItem.model_construct(embedding_id=services.cache.put(v), vector=v.tolist()) for v in vectors]
    info = services.embedder.info
    return unvalidated_json(EmbedResponse.model_construct(model=info.model_name, dim=info.embedding_dim, embeddings=items))
