"""The kept versions of a detector state, and rollback to one of them (as a new version)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import DetectorName, Model, ReadAccess, Services, WriteAccess
from service.api.job_schemas import DetectorVersion, RollbackBody, VersionList
from service.api.problems import problem_responses
from service.api.routes.detectors import detector_info
from service.api.schemas import DetectorInfo
from service.errors import DetectorNotFoundError

router = APIRouter(prefix="/v1/models/{model}/detectors", tags=["detectors"])


@router.get("/{name}/versions", response_model=VersionList, responses=problem_responses(404, 422, 503))
async def list_versions(_: ReadAccess, model: Model, name: DetectorName, services: Services) -> VersionList:
    """The last ``OOD_STATE_KEEP`` versions, newest first, each with where it came from."""
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    store = services.states.store
    kept = await run_in_threadpool(store.versions, model.name, name)
    active = model.detectors[name].stored.version
    versions = [DetectorVersion(**v.to_json(), active=v.version == active) for v in kept]
    return VersionList(model=model.name, detector=name, keep=store.keep, versions=versions)


@router.post(
    "/{name}/rollback",
    response_model=DetectorInfo,
    responses={
        200: {"model": DetectorInfo, "description": "The active state: the restored version as a new version"},
        **problem_responses(400, 401, 403, 404, 413, 415, 422, 429, 503, 507),
    },
)
async def rollback(
    _: WriteAccess, model: Model, name: DetectorName, body: RollbackBody, services: Services
) -> JSONResponse:
    """Validate the kept ``version`` against the model and activate it as the next version (zero downtime,
    like an upload); the active version itself changes nothing. 404 for a version that is not kept."""
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    active = await run_in_threadpool(services.states.rollback, model, name, body.version)
    return JSONResponse(detector_info(active).model_dump(mode="json"))
