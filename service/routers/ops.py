"""Operations: Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.state import State

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics of this worker process")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
