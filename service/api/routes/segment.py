"""POST /v1/models/{model}/segment: per image and detector, a per-pixel anomaly map at input resolution.

decode -> submit -> shape: thresholds, ``ood_share`` and ``max_score`` come finished from the batch worker
(:mod:`service.engine.verdicts`); this route only encodes the maps and assembles the answer.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import Detectors, ReadableModel, ScoringQuery, Services, TargetTPR, Threshold
from service.api.routes.score import SCORING_ERRORS, LeanRoute, decode_and_submit
from service.api.schemas import IMAGES_BODY, SegmentResponse
from service.engine.maps import MapFormat, parse_map_size

router = APIRouter(prefix="/v1/models/{model}", tags=["scoring"], route_class=LeanRoute)
INLINE_RENDER_BYTES = 256 * 1024
"""Answers estimated larger than this are serialised in the thread pool, so the event loop never blocks on them."""


@router.post("/segment", openapi_extra=IMAGES_BODY, response_model=SegmentResponse, responses=SCORING_ERRORS)
async def segment(
    model: ReadableModel,
    request: Request,
    services: Services,
    detectors: Detectors = None,
    threshold: Threshold = None,
    tpr: TargetTPR = None,
    format: MapFormat = Query("png", description="anomaly map encoding: png (16-bit), npy (float16) or json"),
    size: str = Query(
        "input",
        description="map size: input (the model's input size), original (the image's) or HEIGHTxWIDTH; at most "
        "OOD_MAX_MAP_PIXELS pixels",
        pattern=r"^(input|original|[1-9][0-9]{0,3}x[1-9][0-9]{0,3})$",
    ),
) -> Response:
    """Per image: ``{"height", "width", "detectors": {name: {"threshold", "ood_share", "max_score", "version",
    "map"}}}`` (the map says its own ``height`` and ``width``); ``ood_share`` is the share of the map's pixels with score above the
    threshold (``null`` without one). Maps are encoded in the batch worker (``service.engine.maps``)."""
    spec = parse_map_size(size)
    query = ScoringQuery.parse(detectors, threshold, tpr)
    active, decoded, results = await decode_and_submit(
        model, request, services, query, "segmentation", "/segment", maps=(format, spec)
    )
    out = [
        {"height": height, "width": width, "detectors": {a.name: result.verdicts[a.name] for a in active}}
        for (_pixels, (height, width)), result in zip(decoded, results, strict=True)
    ]
    payload = {"model": model.name, "results": out}
    encoded = sum(len(r.verdicts[a.name]["map"]["data"]) for r in results for a in active)
    if format != "json" and encoded <= INLINE_RENDER_BYTES:
        body = orjson.dumps(payload)
    else:
        body = await run_in_threadpool(orjson.dumps, payload)
    return Response(body, media_type="application/json")
