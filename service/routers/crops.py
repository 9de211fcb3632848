from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from service.deps import get_services
from service.errors import documented, not_found
from service.schemas import STORE_INT_MAX
from service.services import Services

router = APIRouter(tags=["gallery"])


@router.get(
    "/crops/{entry_id}", response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **documented(404, 422, 503)},
)
def crop(
    entry_id: Annotated[int, Path(ge=0, le=STORE_INT_MAX)], services: Annotated[Services, Depends(get_services)]
) -> Response:
    """The crop stored with a gallery entry (JPEG)."""
    data = services.gallery.crop(entry_id)
    if data is None:
        raise not_found("unknown_crop", f"no stored crop for entry {entry_id}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400, immutable"})
