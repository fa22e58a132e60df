"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ReadAccess, Services
from service.api.problems import problem_responses
from service.api.schemas import Health, Readiness
from service.errors import NotReadyError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=problem_responses(503))
async def healthz(services: Services) -> Health:
    """Liveness: the process serves HTTP and start-up has not failed."""
    if services.catalog.failure is not None:
        raise NotReadyError(services.catalog.failure)
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
async def readyz(services: Services) -> Readiness:
    """Readiness: models loaded, detector states loaded, every batcher warmed up."""
    services.catalog.require_ready()
    return Readiness(status="ready", models=sorted(services.catalog.models))


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        },
        **problem_responses(),
    },
)
async def metrics(services: Services, _: ReadAccess) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
