"""Every error answer has one shape, ``{"detail": "<sentence>", "code": "<machine code>"}``:
the exceptions that carry one, the response that sends it, and its OpenAPI declaration."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse


class StartupError(RuntimeError):
    """The service cannot start as configured; the message is one line for the operator."""


class ClientError(Exception):
    """An answer other than success: ``detail`` says what happened, ``kind`` is the body's
    ``code`` and labels reid_errors_total; ``headers`` go out with it (Retry-After)."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers


def not_found(kind: str, detail: str) -> ClientError:
    return ClientError(404, kind, detail)


def bad_request(kind: str, detail: str) -> ClientError:
    return ClientError(422, kind, detail)


def retry_later(kind: str, detail: str, retry_after_s: int) -> ClientError:
    """A 503 the client should retry (here or at another replica) after Retry-After seconds."""
    return ClientError(503, kind, detail, headers={"Retry-After": str(max(1, retry_after_s))})


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body; ASGI middleware sends it too (a JSONResponse is an ASGI app)."""
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


# -- OpenAPI --------------------------------------------------------------------------------

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}

WHEN = {
    400: "malformed request body (not parseable multipart/form-data)",
    401: "X-API-Key missing or wrong (only when the service has an API key)",
    404: "unknown resource",
    413: "the body, an image's pixels or the number of images is over its limit",
    415: "an upload is not an image that can be decoded",
    422: "invalid parameter or form field (code `validation`, or a specific code such as `bad_k`)",
    503: "not ready yet (`not_ready`), overloaded (`overloaded`), shutting down (`shutting_down`) or the gallery "
    "database unreachable (`store_unavailable`): nothing was written; retry after Retry-After",
    504: "the request's deadline (REID_REQUEST_TIMEOUT_S) passed before its images were embedded",
}


def documented(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a route: each status with the error schema (and Retry-After on 503)."""
    from service.schemas import Error  # schemas imports this module

    responses: dict[int | str, dict] = {}
    for status in statuses:
        response = {"model": Error, "description": f"{HTTPStatus(status).phrase}: {WHEN[status]}"}
        if status == 503:
            response["headers"] = RETRY_AFTER
        responses[status] = response
    return responses
