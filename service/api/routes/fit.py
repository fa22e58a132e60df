"""POST /v1/models/{model}/detectors/{name}/fit: fit a detector on labelled images through the served
preprocessing, calibrate it on a held-out share, and install it like an upload."""

from __future__ import annotations

import json
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.bodies import ParsedBody, read_body
from service.api.deps import ApiServices, DetectorName, Model, Services, WriteAccess
from service.api.routes.detectors import WRITTEN, written
from service.api.schemas import FIT_BODY, DetectorInfo
from service.engine.active import ActiveDetector
from service.engine.decode import decode_image
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.states.fitting import fit_state, split_calibration

router = APIRouter(prefix="/v1/models/{model}/detectors", tags=["detectors"])


def _field(body: ParsedBody, key: str, default: Any = None) -> Any:
    value = body.fields.get(key, default)
    if isinstance(value, list) and body.instances == []:  # multipart: repeated form fields
        return value if key == "labels" else value[-1]
    return value


def _labels(body: ParsedBody) -> torch.Tensor:
    if body.instances:
        raw: list[Any] = [inst.get("label") for inst in body.instances]
    else:
        raw = [v for part in _field(body, "labels", []) for v in str(part).split(",") if v.strip()]
    try:
        labels = [int(v) for v in raw]
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"labels must be integers (class index, < 0 for OOD): {exc}") from exc
    if any(not -(2**63) <= v < 2**63 for v in labels):
        raise BadRequestError("labels must be 64-bit integers (class index, < 0 for OOD)")
    if len(labels) != len(body.images):
        raise BadRequestError(f"{len(labels)} labels for {len(body.images)} images")
    return torch.tensor(labels, dtype=torch.int64)


def _options(body: ParsedBody, default_share: float) -> tuple[str, dict[str, Any], float]:
    class_name = _field(body, "detector_class")
    if not isinstance(class_name, str) or not class_name:
        raise BadRequestError("give the detector class in 'detector_class' (e.g. Mahalanobis)")
    hparams = _field(body, "hparams", {}) or {}
    if isinstance(hparams, str):
        try:
            hparams = json.loads(hparams)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"'hparams' is not valid JSON: {exc}") from exc
    if not isinstance(hparams, dict):
        raise BadRequestError("'hparams' must be a JSON object")
    try:
        share = float(_field(body, "calibration_share", default_share))
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"'calibration_share' must be a number: {exc}") from exc
    if not 0.0 < share < 1.0:
        raise BadRequestError(f"'calibration_share' must be in (0, 1), got {share}")
    return class_name, hparams, share


def _fit(services: ApiServices, model: ServedModel, name: str, body: ParsedBody) -> ActiveDetector:
    labels = _labels(body)
    class_name, hparams, share = _options(body, services.settings.fit_calibration_share)
    fit_index, cal_index = split_calibration(labels, share)
    pixels = [model.preprocessor.pixels(decode_image(raw, services.settings.max_pixels)) for raw in body.images]
    data = fit_state(
        model,
        class_name,
        hparams,
        model.forward_chunks([pixels[i] for i in fit_index.tolist()]),
        labels[fit_index],
        model.forward_chunks([pixels[i] for i in cal_index.tolist()]),
    )
    return services.states.install(model, name, data)


@router.post(
    "/{name}/fit",
    openapi_extra=FIT_BODY,
    status_code=201,
    response_model=DetectorInfo,
    responses=WRITTEN,
)
async def fit_detector(
    _: WriteAccess, model: Model, name: DetectorName, request: Request, services: Services
) -> JSONResponse:
    """Multipart: ``files`` + ``labels`` (comma-separated or repeated) + ``detector_class`` + optional ``hparams``
    (JSON) and ``calibration_share``; or JSON ``{"detector_class", "hparams", "calibration_share",
    "instances": [{"b64", "label"}]}``. 201 when new, 200 when replacing; the state is then downloadable."""
    body = await read_body(request, services.settings.max_fit_images)
    existed = name in model.detectors
    active = await run_in_threadpool(_fit, services, model, name, body)
    return written(active, existed)
