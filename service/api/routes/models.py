"""Served models."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import Model, ReadAccess, Services
from service.api.problems import problem_responses
from service.api.schemas import ModelInfo, ModelList
from service.engine.served_model import ServedModel

router = APIRouter(prefix="/v1", tags=["models"])


def model_info(model: ServedModel) -> ModelInfo:
    height, width = model.config.input_size
    return ModelInfo(
        name=model.name,
        task=model.task,
        classes=model.labels,
        input_size=[height, width],
        device=str(model.device),
        detectors=sorted(model.detectors),
    )


@router.get("/models", response_model=ModelList, responses=problem_responses(503))
async def list_models(_: ReadAccess, services: Services) -> ModelList:
    """Every served model with its task, classes, input size, device and active detectors."""
    services.catalog.require_ready()
    return ModelList(models=[model_info(m) for m in services.catalog])


@router.get("/models/{model}", response_model=ModelInfo, responses=problem_responses(404, 422, 503))
async def get_model(_: ReadAccess, model: Model) -> ModelInfo:
    return model_info(model)
