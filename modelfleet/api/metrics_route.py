"""``GET /metrics``: the Prometheus text exposition.

Public (no API key), as Prometheus scrape targets usually are; restrict it at
the reverse proxy or bind address if the gateway is exposed (docs/metrics.md).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from modelfleet.metrics import Metrics


def router(metrics: Metrics) -> APIRouter:
    api = APIRouter()

    # async: the live snapshot is read on the event loop, where the fleet state lives.
    @api.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    return api
