"""POST /v1/models/{model}/score: per image, the prediction and every selected detector's verdict.

decode -> submit -> shape: the verdicts come finished from the batch worker (:mod:`service.engine.verdicts`);
this route only assembles them in request order.
"""

from __future__ import annotations

from typing import NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.bodies import read_body
from service.api.deps import ApiServices, Detectors, ReadableModel, ScoringQuery, Services, TargetTPR, Threshold
from service.api.problems import problem_responses
from service.api.schemas import IMAGES_BODY, ScoreResponse
from service.engine import submit
from service.engine.active import ActiveDetector
from service.engine.items import ItemResult
from service.engine.maps import MapFormat, MapSize, map_sizes
from service.engine.served_model import ServedModel

router = APIRouter(prefix="/v1/models/{model}", tags=["scoring"])
SCORING_ERRORS = problem_responses(400, 404, 408, 413, 415, 422, 429, 503, 504)


class Scored(NamedTuple):
    detectors: tuple[ActiveDetector, ...]
    decoded: submit.Decoded
    results: list[ItemResult]


async def decode_and_submit(
    model: ServedModel,
    request: Request,
    services: ApiServices,
    query: ScoringQuery,
    task: str,
    route: str,
    maps: tuple[MapFormat, MapSize] | None = None,
) -> Scored:
    """What ``/score`` and ``/segment`` share: resolve (task, thresholds, detectors) -> read the body -> decode ->
    (segmentation: size the maps within the limits) -> submit; the results come back finished from the worker."""
    settings = services.settings
    detectors = submit.resolve(model, task, route, query.detectors, query.threshold, query.tpr)
    body = await read_body(request, settings.max_images_per_request)
    decoded = await submit.decode_images(model, body.images, settings.max_pixels)
    if maps is None:
        results = await submit.submit(model, decoded, detectors, query.threshold, query.tpr)
        return Scored(detectors, decoded, results)
    fmt, spec = maps
    sizes = map_sizes(
        spec,
        model.config.input_size,
        [original for _, original in decoded],
        len(detectors),
        fmt,
        settings.max_map_pixels,
        settings.max_response_bytes,
    )
    results = await submit.submit(model, decoded, detectors, query.threshold, query.tpr, fmt, sizes)
    return Scored(detectors, decoded, results)


@router.post("/score", openapi_extra=IMAGES_BODY, response_model=ScoreResponse, responses=SCORING_ERRORS)
async def score(
    model: ReadableModel,
    request: Request,
    services: Services,
    detectors: Detectors = None,
    threshold: Threshold = None,
    tpr: TargetTPR = None,
) -> JSONResponse:
    """Images as multipart ``files`` or JSON ``{"instances": [{"b64": ...}]}``. Returns, in request order,
    ``{"prediction": {"index", "label", "probability"}, "detectors": {name: {"score", "threshold", "is_ood",
    "p_value", "version"}}}``; ``threshold`` is the one used (``?threshold=``, else the calibration's at ``?tpr=`` or
    its target, 95%)."""
    query = ScoringQuery.parse(detectors, threshold, tpr)
    active, _decoded, results = await decode_and_submit(model, request, services, query, "classification", "/score")
    labels = model.labels
    per_image = [
        {"prediction": r.prediction(labels), "detectors": {a.name: r.verdicts[a.name] for a in active}} for r in results
    ]
    return JSONResponse({"model": model.name, "results": per_image})
