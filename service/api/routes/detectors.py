"""Detector states of a model: list, upload (validated, atomic, zero-downtime swap), download, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.bodies import media_type
from service.api.deps import DetectorName, Model, ReadAccess, Services, WriteAccess
from service.api.multipart import parse_multipart
from service.api.problems import problem_responses
from service.api.schemas import STATE_BODY, DetectorInfo, DetectorList
from service.engine.active import ActiveDetector
from service.errors import BadRequestError, DetectorNotFoundError, UnsupportedMediaTypeError

router = APIRouter(prefix="/v1/models/{model}/detectors", tags=["detectors"])
STATE_MEDIA_TYPE = "application/octet-stream"
WRITTEN: dict[int | str, dict[str, Any]] = {
    200: {"model": DetectorInfo, "description": "Replaced the active state of that name"},
    201: {"model": DetectorInfo, "description": "Created a new detector"},
    **problem_responses(400, 401, 403, 404, 413, 415, 422, 503),
}
"""Answers of a write that installs a state (upload, fit)."""


def detector_info(active: ActiveDetector) -> DetectorInfo:
    calibration = active.detector.calibration
    stored = active.stored
    return DetectorInfo(
        name=stored.name,
        version=stored.version,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        detector_class=stored.detector_class,
        uploaded_at=stored.uploaded_at,
        input_kind=active.input_kind,  # type: ignore[arg-type]  # servable kinds only (states.validate)
        calibrated=calibration is not None,
        default_threshold=None if calibration is None else calibration.threshold(),
        target_tpr=None if calibration is None else calibration.target_tpr,
    )


def written(active: ActiveDetector, existed: bool) -> JSONResponse:
    """201 for a new detector, 200 for a replaced one."""
    return JSONResponse(detector_info(active).model_dump(mode="json"), status_code=200 if existed else 201)


@router.get("", response_model=DetectorList, responses=problem_responses(404, 422, 503))
async def list_detectors(_: ReadAccess, model: Model) -> DetectorList:
    return DetectorList(model=model.name, detectors=[detector_info(a) for _, a in sorted(model.detectors.items())])


async def _state_bytes(request: Request) -> bytes:
    kind = media_type(request)
    if kind == "multipart/form-data":
        parts = parse_multipart(await request.body(), request.headers.get("content-type", ""))
        upload = next((p for p in parts if p.name in ("file", "state") and p.is_file), None)
        if upload is None:
            raise BadRequestError("multipart upload needs the state in a 'file' part")
        return upload.data
    if kind in ("", "application/octet-stream", "application/x-safetensors"):  # no type: the raw state file
        return await request.body()
    raise UnsupportedMediaTypeError(
        f"content type {kind or '(none)'!r} is not accepted; send the safetensors state as "
        "application/octet-stream or as a multipart 'file' part"
    )


@router.put(
    "/{name}",
    openapi_extra=STATE_BODY,
    status_code=201,
    response_model=DetectorInfo,
    responses=WRITTEN,
)
async def upload_detector(
    _: WriteAccess, model: Model, name: DetectorName, request: Request, services: Services
) -> JSONResponse:
    """Upload a state saved by ``ood_core.state.save_detector``; validated against the model before it
    replaces the active one (422 with the reason otherwise). 201 when new, 200 when replacing."""
    data = await _state_bytes(request)
    existed = name in model.detectors
    active = await run_in_threadpool(services.states.install, model, name, data)
    return written(active, existed)


@router.get(
    "/{name}",
    response_class=Response,
    responses={
        200: {
            "description": "The active state file, byte-identical to what was uploaded (ETag: its sha256)",
            "content": {STATE_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        **problem_responses(404, 422, 503),
    },
)
async def download_detector(_: ReadAccess, model: Model, name: DetectorName, services: Services) -> Response:
    """The active state file, byte-identical to what was uploaded."""
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    stored, data = await run_in_threadpool(services.states.store.read, model.name, name)
    headers = {
        "ETag": f'"{stored.sha256}"',
        "X-Detector-Version": str(stored.version),
        "Content-Disposition": f'attachment; filename="{model.name}-{name}-v{stored.version}.safetensors"',
    }
    return Response(data, media_type=STATE_MEDIA_TYPE, headers=headers)


@router.delete(
    "/{name}",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "Deleted with all its versions"}, **problem_responses(401, 403, 404, 422, 503)},
)
async def delete_detector(_: WriteAccess, model: Model, name: DetectorName, services: Services) -> Response:
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    await run_in_threadpool(services.states.remove, model, name)
    return Response(status_code=204)
