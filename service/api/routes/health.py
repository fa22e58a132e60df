"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import Context, ReadAccess
from service.errors import NotReadyError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(context: Context) -> dict[str, str]:
    """Liveness: the process serves HTTP and start-up has not failed."""
    if context.failure is not None:
        raise NotReadyError(context.failure)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(context: Context) -> dict[str, object]:
    """Readiness: models loaded, detector states loaded, every batcher warmed up."""
    if not context.ready:
        raise NotReadyError(context.failure or "the service is warming up")
    return {"status": "ready", "models": sorted(context.models)}


@router.get("/metrics")
async def metrics(context: Context, _: ReadAccess) -> Response:
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)
