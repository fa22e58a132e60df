"""POST /v1/models/{model}/score: per image, the prediction and every selected detector's verdict."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import Context, DetectorSelection, Model, ReadAccess, TargetTPR, Threshold
from service.images import IMAGES_OPENAPI
from service.inference import decode_request, require_task, resolve_detectors, run_items
from service.scoring import check_threshold_params

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
    "p_value"}}}``; ``threshold`` is the one used (``?threshold=``, else the calibration's at ``?tpr=`` or 95%).

    Verdicts and p-values are computed in the batch worker, vectorized per batch (``service.scoring``)."""
    require_task(model, "classification", "/score")
    check_threshold_params(threshold, tpr)
    detectors = resolve_detectors(model, selection)
    decoded = await decode_request(context, model, request)
    results = await run_items(context, model, decoded, detectors, with_maps=False, threshold=threshold, tpr=tpr)
    context.metrics.observe_verdicts(model.name, results)
    labels = model.labels
    per_image = [
        {"prediction": r.prediction(labels), "detectors": {a.name: r.verdicts[a.name] for a in detectors}}
        for r in results
    ]
    return JSONResponse({"model": model.name, "results": per_image})
