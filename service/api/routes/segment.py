"""POST /v1/models/{model}/segment: per image and detector, a per-pixel anomaly map at input resolution."""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from PIL import Image
from torch import Tensor

from service.deps import Context, DetectorSelection, Model, ReadAccess, TargetTPR, Threshold
from service.images import IMAGES_OPENAPI
from service.inference import decode_request, require_task, resolve_detectors, run_items
from service.scoring import check_threshold_params, json_float, threshold_for

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


@router.post("/segment", openapi_extra=IMAGES_OPENAPI)
async def segment(
    _: ReadAccess,
    model: Model,
    request: Request,
    context: Context,
    selection: DetectorSelection,
    threshold: Threshold = None,
    tpr: TargetTPR = None,
    format: MapFormat = Query("png", description="anomaly map encoding: png (16-bit), npy (float16) or json"),
) -> JSONResponse:
    """Per image: ``{"height", "width", "detectors": {name: {"threshold", "ood_share", "max_score", "map"}}}``;
    ``ood_share`` is the share of pixels with score above the threshold (``null`` without one)."""
    require_task(model, "segmentation", "/segment")
    check_threshold_params(threshold, tpr)
    detectors = resolve_detectors(model, selection)
    decoded = await decode_request(context, model, request)
    results = await run_items(context, model, decoded, detectors, with_maps=True)
    out = []
    for (_pixels, (height, width)), result in zip(decoded, results, strict=True):
        entry: dict[str, Any] = {"height": height, "width": width, "detectors": {}}
        for active in detectors:
            scores = result.maps[active.name]
            used = threshold_for(active, threshold, tpr)
            share = None if used is None else float((scores > used).float().mean())
            max_score = float(scores.max())
            # image-level verdict for the metrics: some pixel above the threshold
            context.metrics.observe_score(
                model.name, active.name, max_score, None if share is None else share > 0, None
            )
            entry["detectors"][active.name] = {
                "threshold": used,
                "ood_share": share,
                "max_score": json_float(max_score),
                "version": active.stored.version,
                "map": encode_map(scores, format),
            }
        out.append(entry)
    return JSONResponse({"model": model.name, "results": out})
