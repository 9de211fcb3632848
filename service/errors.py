"""Errors a client caused: each carries its HTTP status, a metrics kind and a message."""

from __future__ import annotations


class ClientError(Exception):
    """A 4xx: the request was wrong; ``detail`` says how, ``kind`` labels reid_errors_total."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


def not_found(kind: str, detail: str) -> ClientError:
    return ClientError(404, kind, detail)


def bad_request(kind: str, detail: str) -> ClientError:
    return ClientError(422, kind, detail)
