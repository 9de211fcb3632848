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


class DuplicateItem(BaseModel):
    identity: str = Field(description="another identity some of the new crops already match")
    score: float = Field(description="the best cosine similarity of a new crop to it")
    entry_id: int = Field(description="its entry that matched")


class EnrollResponse(BaseModel):
    identity: str
    entries: list[Entry]
    gallery_size: int = Field(description="searchable entries after this enrollment")
    likely_duplicates: list[DuplicateItem] | None = Field(
        description="other identities the new crops match at or above the threshold in force, best first: this "
        "person may already be enrolled under another name (the crops are stored anyway). Null when no threshold "
        "is in force (uncalibrated checkpoint and no REID_MATCH_THRESHOLD)"
    )


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
    match: bool | None = Field(description="score >= threshold: the same person; null when no threshold is in force")


class QueryResponse(BaseModel):
    matches: list[MatchItem] = Field(description="best first (with rerank=true: in re-ranked order)")
    gallery_size: int
    gallery_stale: bool = Field(
        description="true when this replica's index has not been confirmed against the gallery store for a while "
        "(the store is unreachable): the ranking may miss recent enrollments and deletions"
    )
    gallery_sync_age_s: float = Field(description="seconds since the index was last confirmed up to date with the store")
    threshold: float | None = Field(
        description="the cosine threshold in force: the query's threshold=, else REID_MATCH_THRESHOLD, else the "
        "checkpoint's calibrated one; null when there is none"
    )
    threshold_source: Literal["query", "setting", "checkpoint"] | None
    decision: Literal["known", "unknown"] | None = Field(
        description="known: the best identity (the first match) scores at or above the threshold; unknown: it "
        "does not, or nothing matched; null when no threshold is in force"
    )
    crops: int = Field(description="crops (images or embedding ids) aggregated into this query: its tracklet length")
    reranked: bool = Field(description="the shortlist was re-ranked with k-reciprocal neighbourhoods (rerank=true)")


class Health(BaseModel):
    status: Literal["ok"]


class BackendTrial(BaseModel):
    backend: str
    precision: str
    min_cosine: float = Field(description="smallest cosine between its embeddings and the fp32 reference's")
    images_per_s: float = Field(description="measured on the calibration batch at start")


class BackendCheck(BaseModel):
    """How the backend and precision were chosen: every candidate measured on a fixed calibration batch."""

    min_cosine: float = Field(description="the serving backend's smallest cosine to the fp32 reference")
    required_min_cosine: float = Field(description="the tolerance (REID_MIN_COSINE); candidates below it never serve")
    from_cache: bool = Field(description="measured at an earlier start on this machine with this checkpoint")
    trials: list[BackendTrial]


class Readiness(BaseModel):
    status: Literal["ready", "starting", "failed", "stopping"]
    detail: str | None = None
    model: str | None = None
    arch: str | None = None
    fingerprint: str | None = None
    backend: str | None = None
    precision: str | None = None
    backend_check: BackendCheck | None = Field(
        None, description="the accuracy and speed check behind the backend; null when one fp32 backend was asked for"
    )
    device: str | None = None
    gallery_size: int | None = None
    identities: int | None = None
    stale_entries: int | None = None
    log_position: int | None = Field(None, description="gallery change-log position the index covers")
    index: str | None = Field(None, description="index kind in use: flat (exact), ivf or hnsw (approximate)")
    gallery_store: str | None = Field(None, description="the gallery store: a SQLite file, or a PostgreSQL URL without password")
    gallery_stale: bool | None = Field(
        None, description="true while the index has not been confirmed against the store for a while (store unreachable)"
    )
    calibrated: bool | None = Field(None, description="the checkpoint carries a calibrated match threshold")
    match_threshold: float | None = Field(
        None, description="threshold a query gets by default; null: /query answers carry no decision"
    )
    threshold_source: Literal["setting", "checkpoint"] | None = None
