"""POST /v1/models/{model}/segment: per image and detector, a per-pixel anomaly map at input resolution.

decode -> submit -> shape: thresholds, ``ood_share`` and ``max_score`` come finished from the batch worker
(:mod:`service.engine.verdicts`); this route only encodes the maps and assembles the answer.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from PIL import Image
from torch import Tensor

from service.api.deps import Model, ReadAccess, Scoring, Services
from service.api.routes.score import SCORING_ERRORS, decode_and_submit
from service.api.schemas import IMAGES_BODY, SegmentResponse

router = APIRouter(prefix="/v1/models/{model}", tags=["scoring"])
MapFormat = Literal["png", "npy", "json"]


def encode_map(scores: Tensor, fmt: MapFormat) -> dict[str, Any]:
    """``png``: 16-bit grayscale, ``value = min + pixel / 65535 * (max - min)``; ``npy``: float16 array;
    ``json``: nested lists (rows). Binary formats are base64 in ``data``. Non-finite scores (JSON has no NaN/Inf)
    are clipped to the finite range (``json``: ``null``)."""
    array = scores.numpy().astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        if fmt == "json":
            rows = [
                [v if ok else None for v, ok in zip(r, f, strict=True)]
                for r, f in zip(array.tolist(), finite.tolist(), strict=True)
            ]
            return {"format": "json", "data": rows}
        values = array[finite] if finite.any() else np.zeros(1, dtype=np.float32)
        array = np.clip(np.nan_to_num(array, nan=float(values.max())), values.min(), values.max())
    low, high = float(array.min()), float(array.max())
    if fmt == "json":
        return {"format": "json", "data": array.tolist()}
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float16), allow_pickle=False)
        return {"format": "npy", "dtype": "float16", "data": base64.b64encode(buffer.getvalue()).decode()}
    span = high - low if high > low else 1.0
    levels = np.round((array - low) / span * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    return {"format": "png", "bits": 16, "min": low, "max": high, "data": base64.b64encode(buffer.getvalue()).decode()}


@router.post("/segment", openapi_extra=IMAGES_BODY, response_model=SegmentResponse, responses=SCORING_ERRORS)
async def segment(
    _: ReadAccess,
    model: Model,
    request: Request,
    services: Services,
    query: Scoring,
    format: MapFormat = Query("png", description="anomaly map encoding: png (16-bit), npy (float16) or json"),
) -> JSONResponse:
    """Per image: ``{"height", "width", "detectors": {name: {"threshold", "ood_share", "max_score", "version",
    "map"}}}``; ``ood_share`` is the share of pixels with score above the threshold (``null`` without one)."""
    detectors, decoded, results = await decode_and_submit(model, request, services, query, "segmentation", "/segment")
    out = []
    for (_pixels, (height, width)), result in zip(decoded, results, strict=True):
        per_detector: dict[str, Any] = {}
        for active in detectors:
            entry = dict(result.verdicts[active.name])
            entry["map"] = encode_map(result.maps[active.name], format)
            per_detector[active.name] = entry
        out.append({"height": height, "width": width, "detectors": per_detector})
    return JSONResponse({"model": model.name, "results": out})
