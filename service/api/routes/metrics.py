"""GET /metrics: Prometheus text format (services/metrics.py says what is in it)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from service.services.metrics import ServiceMetrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics of the newest runs and of this process's ingest."""
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)
