from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import not_found

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    """The hand-operated page (enrol, query, see ranked crops)."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise not_found("no_page", "the web page is not installed (service/static/index.html)")
    return FileResponse(index)
