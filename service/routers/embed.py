from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Response, UploadFile

from service.deps import get_services
from service.pipeline import embed_uploads
from service.schemas import EmbeddingItem, EmbedResponse, Error, unvalidated_json
from service.services import Services

router = APIRouter(tags=["embed"])


@router.post("/embed", response_model=EmbedResponse, responses={413: {"model": Error}, 415: {"model": Error}})
async def embed(
    image: Annotated[list[UploadFile], File(description="one or more person crops")],
    services: Annotated[Services, Depends(get_services)],
) -> Response:
    """Embed crops; each id can be passed to GET /query until it expires from the cache."""
    vectors, _ = await embed_uploads(services, image)
    items = [EmbeddingItem.model_construct(embedding_id=services.cache.put(v), vector=v.tolist()) for v in vectors]
    info = services.embedder.info
    return unvalidated_json(EmbedResponse.model_construct(model=info.model_name, dim=info.embedding_dim, embeddings=items))
