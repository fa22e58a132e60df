"""Detector states of a model: list, upload (validated, atomic, zero-downtime swap), download, delete."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import DetectorName, Model, ReadAccess, Services, WriteAccess
from service.api.problems import problem_responses
from service.api.schemas import STATE_BODY, DetectorInfo, DetectorList
from service.api.uploads import stream_state
from service.engine.active import ActiveDetector
from service.errors import DetectorNotFoundError

router = APIRouter(prefix="/v1/models/{model}/detectors", tags=["detectors"])
STATE_MEDIA_TYPE = "application/octet-stream"
WRITTEN: dict[int | str, dict[str, Any]] = {
    200: {"model": DetectorInfo, "description": "Replaced the active state of that name"},
    201: {"model": DetectorInfo, "description": "Created a new detector"},
    **problem_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 503, 507),
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
        calibration_size=None if calibration is None else calibration.n,
        warnings=[] if calibration is None else calibration_warnings(calibration.n, calibration.target_tpr),
    )


def calibration_warnings(n: int, tpr: float) -> list[str]:
    """A calibration of ``n`` scores cannot place a threshold at ``tpr`` below its largest score when
    ``n < 1 / (1 - tpr)``: that threshold accepts every calibration image and its TPR means nothing."""
    if tpr >= 1.0 or n >= 1.0 / (1.0 - tpr):
        return []
    need = math.ceil(1.0 / (1.0 - tpr) - 1e-9)
    return [
        f"calibration set of {n} score(s) is too small for a {tpr:.0%} TPR threshold (at least {need} needed): "
        "the threshold is the largest calibration score"
    ]


def written(active: ActiveDetector, existed: bool) -> JSONResponse:
    """201 for a new detector, 200 for a replaced one."""
    return JSONResponse(detector_info(active).model_dump(mode="json"), status_code=200 if existed else 201)


@router.get("", response_model=DetectorList, responses=problem_responses(404, 422, 503))
async def list_detectors(_: ReadAccess, model: Model) -> DetectorList:
    return DetectorList(model=model.name, detectors=[detector_info(a) for _, a in sorted(model.detectors.items())])


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
    replaces the active one (422 with the reason otherwise). 201 when new, 200 when replacing. The body is the
    raw file (``application/octet-stream``, no content type, or curl's default for ``--data-binary``,
    ``application/x-www-form-urlencoded``) or a multipart ``file`` part. It streams
    into a file on the state volume (:mod:`service.api.uploads`), which is loaded from there and renamed into
    place; a refused or interrupted upload leaves nothing (507 when the volume is full)."""
    store = services.states.store
    with store.upload() as upload:
        await stream_state(request, upload.file)
        existed = name in model.detectors
        active = await run_in_threadpool(services.states.install_file, model, name, upload.path)
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
    responses={
        204: {"description": "Deleted with all its versions"},
        **problem_responses(401, 403, 404, 422, 429, 503),
    },
)
async def delete_detector(_: WriteAccess, model: Model, name: DetectorName, services: Services) -> Response:
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    await run_in_threadpool(services.states.remove, model, name)
    return Response(status_code=204)
