"""POST /v1/models/{model}/score: per image, the prediction and every selected detector's verdict."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import Context, DetectorSelection, Model, ReadAccess, TargetTPR, Threshold
from service.images import IMAGES_OPENAPI
from service.inference import decode_request, require_task, resolve_detectors, run_items
from service.scoring import check_threshold_params, json_float, threshold_for, verdicts

router = APIRouter(prefix="/v1/models/{model}", tags=["scoring"])


@router.post("/score", openapi_extra=IMAGES_OPENAPI)
async def score(
    _: ReadAccess,
    model: Model,
    request: Request,
    context: Context,
    selection: DetectorSelection,
    threshold: Threshold = None,
    tpr: TargetTPR = None,
) -> JSONResponse:
    """Images as multipart ``files`` or JSON ``{"instances": [{"b64": ...}]}``. Returns, in request order,
    ``{"prediction": {"index", "label", "probability"}, "detectors": {name: {"score", "threshold", "is_ood",
    "p_value"}}}``; ``threshold`` is the one used (``?threshold=``, else the calibration's at ``?tpr=`` or 95%)."""
    require_task(model, "classification", "/score")
    check_threshold_params(threshold, tpr)
    detectors = resolve_detectors(model, selection)
    decoded = await decode_request(context, model, request)
    results = await run_items(context, model, decoded, detectors, with_maps=False)
    per_image: list[dict[str, Any]] = [
        {
            "prediction": {
                "index": r.class_index,
                "label": model.labels[r.class_index] if r.class_index is not None else None,
                "probability": r.probability,
            },
            "detectors": {},
        }
        for r in results
    ]
    for active in detectors:
        scores = torch.tensor([r.scores[active.name] for r in results], dtype=torch.float64)
        used = threshold_for(active, threshold, tpr)
        is_ood, p_values = verdicts(active, scores, used)
        for i, entry in enumerate(per_image):
            verdict = None if is_ood is None else bool(is_ood[i])
            p_value = None if p_values is None else float(p_values[i])
            entry["detectors"][active.name] = {
                "score": json_float(float(scores[i])),
                "threshold": used,
                "is_ood": verdict,
                "p_value": p_value,
                "version": active.stored.version,
            }
            context.metrics.observe_score(model.name, active.name, float(scores[i]), verdict, p_value)
    return JSONResponse({"model": model.name, "results": per_image})
