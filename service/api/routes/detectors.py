"""Detector states of a model: list, upload (validated, atomic, zero-downtime swap), download, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.deps import Context, DetectorName, Model, ReadAccess, WriteAccess
from service.errors import BadRequestError, DetectorNotFoundError, UnsupportedMediaTypeError
from service.images import media_type
from service.multipart import parse_multipart
from service.runtime import ActiveDetector

router = APIRouter(prefix="/v1/models/{model}/detectors", tags=["detectors"])
STATE_MEDIA_TYPE = "application/octet-stream"
STATE_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            STATE_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


def describe(active: ActiveDetector) -> dict[str, Any]:
    calibration = active.detector.calibration
    return {
        **active.stored.public(),
        "input_kind": active.input_kind,
        "calibrated": calibration is not None,
        "default_threshold": None if calibration is None else calibration.threshold(),
        "target_tpr": None if calibration is None else calibration.target_tpr,
    }


@router.get("")
async def list_detectors(_: ReadAccess, model: Model) -> dict[str, Any]:
    return {"model": model.name, "detectors": [describe(a) for _, a in sorted(model.detectors.items())]}


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


@router.put("/{name}", openapi_extra=STATE_OPENAPI)
async def upload_detector(_: WriteAccess, model: Model, name: DetectorName, request: Request, context: Context):
    """Upload a state saved by ``ood_core.state.save_detector``; validated against the model before it
    replaces the active one (422 with the reason otherwise). 201 when new, 200 when replacing."""
    data = await _state_bytes(request)
    existed = name in model.detectors
    active = await run_in_threadpool(context.install, model, name, data)
    return JSONResponse(describe(active), status_code=200 if existed else 201)


@router.get("/{name}")
async def download_detector(_: ReadAccess, model: Model, name: DetectorName, context: Context) -> Response:
    """The active state file, byte-identical to what was uploaded."""
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    stored, data = await run_in_threadpool(context.store.read, model.name, name)
    headers = {
        "ETag": f'"{stored.sha256}"',
        "X-Detector-Version": str(stored.version),
        "Content-Disposition": f'attachment; filename="{model.name}-{name}-v{stored.version}.safetensors"',
    }
    return Response(data, media_type=STATE_MEDIA_TYPE, headers=headers)


@router.delete("/{name}", status_code=204)
async def delete_detector(_: WriteAccess, model: Model, name: DetectorName, context: Context) -> Response:
    if name not in model.detectors:
        raise DetectorNotFoundError(f"model {model.name!r} has no detector {name!r}")
    await run_in_threadpool(context.remove, model, name)
    return Response(status_code=204)
