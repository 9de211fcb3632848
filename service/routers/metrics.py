from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import get_metrics
from service.metrics import Metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(m: Annotated[Metrics, Depends(get_metrics)]) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
