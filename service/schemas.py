"""Request validation and the typed response bodies (/docs shows them as the API reference)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import Response
from pydantic import BaseModel, Field

from service.errors import bad_request

IDENTITY_MAX_CHARS = 128
# The largest integer the store holds (SQLite INTEGER): bigger ids, offsets or cameras are a 422.
STORE_INT_MAX = 2**63 - 1


def validate_identity(raw: str) -> str:
    """An identity is 1-128 printable characters without '/', surrounding spaces trimmed."""
    identity = raw.strip()
    if not identity:
        raise bad_request("bad_identity", "identity is empty")
    if len(identity) > IDENTITY_MAX_CHARS:
        raise bad_request("bad_identity", f"identity is {len(identity)} characters; at most {IDENTITY_MAX_CHARS}")
    if not identity.isprintable():
        raise bad_request("bad_identity", "identity contains non-printable characters")
    if "/" in identity:
        raise bad_request("bad_identity", "identity must not contain '/'")
    return identity


def unvalidated_json(body: BaseModel, status_code: int = 200) -> Response:
    """A response model built with model_construct from trusted values, serialised as is.

    Returning the model itself makes FastAPI validate it again field by field: for /embed,
    1024 floats per crop, a third of the request's Python time."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")


class Error(BaseModel):
    """Every error answer (4xx, 5xx) has this body."""

    detail: str = Field(description="what went wrong, as a sentence for a person")
    code: str = Field(
        description="what went wrong, for a program: e.g. validation, not_image, too_large, bad_identity, "
        "unknown_identity, unauthorized, not_ready, overloaded, shutting_down, timeout (docs/service.md lists them all)"
    )


class EmbeddingItem(BaseModel):
    embedding_id: str = Field(description="use with GET /query until it expires")
    vector: list[float] = Field(description="L2-normalised embedding")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[EmbeddingItem]


class Entry(BaseModel):
    entry_id: int
    camera: int | None
    created_at: dt.datetime
    has_crop: bool
    model_fingerprint: str


class EnrollResponse(BaseModel):
    identity: str
    entries: list[Entry]
    gallery_size: int = Field(description="searchable entries after this enrollment")


class IdentitySummary(BaseModel):
    identity: str
    entries: int


class GalleryPage(BaseModel):
    identities: list[IdentitySummary]
    total: int = Field(description="identities in the gallery")
    offset: int
    limit: int
    gallery_size: int = Field(description="searchable entries (current model)")
    stale_entries: int = Field(description="entries made by another model, excluded until `service reembed`")


class IdentityDetail(BaseModel):
    identity: str
    entries: list[Entry]


class MatchItem(BaseModel):
    identity: str
    score: float = Field(description="cosine similarity, in [-1, 1]")
    entry_id: int
    camera: int | None


class QueryResponse(BaseModel):
    matches: list[MatchItem]
    gallery_size: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "starting", "failed", "stopping"]
    detail: str | None = None
    model: str | None = None
    arch: str | None = None
    fingerprint: str | None = None
    backend: str | None = None
    device: str | None = None
    gallery_size: int | None = None
    identities: int | None = None
    stale_entries: int | None = None
