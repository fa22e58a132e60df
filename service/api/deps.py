"""Shared route dependencies as ``Annotated`` aliases (``async def``: FastAPI runs plain ``def`` dependencies in
the thread pool, one thread hop each)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request

from service.context import ServiceContext
from service.runtime import ServedModel
from service.store import check_name


async def get_context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


Context = Annotated[ServiceContext, Depends(get_context)]


async def require_write(context: Context, authorization: Annotated[str | None, Header()] = None) -> None:
    """Writes always need a valid API key (401 without, 403 with a wrong one)."""
    context.keys.check(authorization)


async def require_read(context: Context, authorization: Annotated[str | None, Header()] = None) -> None:
    """Reads need a key only when ``OOD_REQUIRE_AUTH_FOR_READ=true``."""
    if context.settings.require_auth_for_read:
        context.keys.check(authorization)


WriteAccess = Annotated[None, Depends(require_write)]
ReadAccess = Annotated[None, Depends(require_read)]


async def get_model(context: Context, model: Annotated[str, Path(description="model name")]) -> ServedModel:
    return context.model(model)


Model = Annotated[ServedModel, Depends(get_model)]


async def get_detector_name(name: Annotated[str, Path(description="detector name")]) -> str:
    return check_name("detector", name)


DetectorName = Annotated[str, Depends(get_detector_name)]


async def parse_detectors(
    detectors: Annotated[str | None, Query(description="comma-separated detector names")] = None,
) -> list[str] | None:
    """``?detectors=a,b`` -> ``["a", "b"]`` (``None``: every active detector)."""
    if detectors is None or not detectors.strip():
        return None
    return [check_name("detector", d.strip()) for d in detectors.split(",") if d.strip()]


DetectorSelection = Annotated[list[str] | None, Depends(parse_detectors)]
Threshold = Annotated[float | None, Query(description="absolute threshold for every detector (overrides tpr)")]
TargetTPR = Annotated[float | None, Query(gt=0.0, le=1.0, description="ID true-positive rate for the threshold")]
