"""Served models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import Context, Model, ReadAccess
from service.errors import NotReadyError

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(_: ReadAccess, context: Context) -> dict[str, list[dict[str, Any]]]:
    """``{"models": [{"name", "task", "classes", "input_size", "device", "detectors"}]}``."""
    if not context.ready:
        raise NotReadyError(context.failure or "the service is warming up")
    return {"models": [m.describe() for m in context.models.values()]}


@router.get("/models/{model}")
async def get_model(_: ReadAccess, model: Model) -> dict[str, Any]:
    return model.describe()
