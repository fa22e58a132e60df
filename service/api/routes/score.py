"""POST /v1/models/{model}/score: per image, the prediction and every selected detector's verdict.

decode -> submit -> shape: the verdicts come finished from the batch worker (:mod:`service.engine.verdicts`);
this route only assembles them in request order and serialises them with orjson.

Both scoring routes use :class:`LeanRoute`: FastAPI's documented extension point (a custom ``APIRoute`` whose
``get_route_handler`` returns the request handler). ``/openapi.json`` still comes from the endpoint's signature
(the ``Annotated`` aliases of :mod:`service.api.deps`), but a request skips FastAPI's general dependency
resolution, about a fifth of the event loop's time per request on the demo: the query parameters are validated by
ONE pydantic model built from the same declarations (same constraints, same 422 messages), and the dependencies
(the model lookup with its read check, the services) are called directly with the request and their path
parameters. A signature the lean handler does not cover falls back to FastAPI's own handler.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import orjson
from fastapi import APIRouter, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError, create_model

from service.api.bodies import read_body
from service.api.deps import ApiServices, Detectors, ReadableModel, ScoringQuery, Services, TargetTPR, Threshold
from service.api.problems import problem_responses
from service.api.schemas import IMAGES_BODY, ScoreResponse
from service.engine import submit
from service.engine.active import ActiveDetector
from service.engine.items import ItemResult
from service.engine.maps import MapFormat, MapSize, map_sizes
from service.engine.served_model import ServedModel

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _plain(dependant: Dependant) -> bool:
    """An async callable taking nothing FastAPI injects but the request and parameters."""
    special = (
        dependant.websocket_param_name,
        dependant.http_connection_param_name,
        dependant.response_param_name,
        dependant.background_tasks_param_name,
        dependant.security_scopes_param_name,
    )
    return inspect.iscoroutinefunction(dependant.call) and not any(special)


def _lean_dependency(sub: Dependant) -> bool:
    """A dependency the lean handler can call itself: async, taking only the request and path parameters."""
    return (
        _plain(sub)
        and not sub.dependencies
        and not (sub.query_params or sub.header_params or sub.cookie_params or sub.body_params)
    )


class LeanRoute(APIRoute):
    """An ``APIRoute`` whose handler validates query parameters with one pydantic model and calls async
    request/path-parameter dependencies directly (see the module docstring). The endpoint must return a
    ``Response``."""

    def get_route_handler(self) -> Handler:
        return self.lean_handler() or super().get_route_handler()

    def lean_handler(self) -> Handler | None:
        """The lean request handler, or ``None`` when the endpoint's signature is not one it covers."""
        dependant = self.dependant
        covered = (
            all(_lean_dependency(sub) for sub in dependant.dependencies)
            and not (dependant.path_params or dependant.header_params or dependant.cookie_params)
            and not dependant.body_params
            and _plain(dependant)
        )
        if not covered:
            return None
        fields: dict[str, Any] = {f.name: (f.field_info.annotation, f.field_info) for f in dependant.query_params}
        query_model: type[BaseModel] = create_model(f"{self.name}_query", **fields)
        names = {f.name: f.alias for f in dependant.query_params}
        endpoint, request_name = dependant.call, dependant.request_param_name
        subs = [
            (str(sub.name), sub.call, sub.request_param_name, [p.name for p in sub.path_params])
            for sub in dependant.dependencies
        ]
        assert endpoint is not None

        async def handle(request: Request) -> Response:
            query = request.query_params
            raw = {name: query[alias] for name, alias in names.items() if alias in query}
            try:
                kwargs: dict[str, Any] = dict(query_model.model_validate(raw).__dict__)  # the fields, in order
            except ValidationError as exc:
                raise RequestValidationError(
                    [{**error, "loc": ("query", *error["loc"])} for error in exc.errors(include_url=False)]
                ) from None
            path = request.path_params
            for name, call, sub_request, path_names in subs:
                args: dict[str, Any] = {p: path[p] for p in path_names}
                if sub_request:
                    args[sub_request] = request
                kwargs[name] = await call(**args)  # type: ignore[misc]
            if request_name:
                kwargs[request_name] = request
            response: Response = await endpoint(**kwargs)
            return response

        return handle


router = APIRouter(prefix="/v1/models/{model}", tags=["scoring"], route_class=LeanRoute)
SCORING_ERRORS = problem_responses(400, 404, 408, 413, 415, 422, 429, 503, 504)


def json_response(payload: Any) -> Response:
    """``application/json`` serialised by orjson (several times faster than the standard library's encoder)."""
    return Response(orjson.dumps(payload), media_type="application/json")


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
    if model.batcher is None:
        raise RuntimeError(f"model {model.name!r} has no batcher")
    with model.batcher.arriving() as arrival:  # an idle worker waits briefly for this request's images
        body = await read_body(request, settings.max_images_per_request)
        decoded = await submit.decode_images(model, body.images, settings.max_pixels)
        if maps is None:
            results = await submit.submit(model, decoded, detectors, query.threshold, query.tpr, arrival=arrival)
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
        results = await submit.submit(
            model, decoded, detectors, query.threshold, query.tpr, fmt, sizes, arrival=arrival
        )
        return Scored(detectors, decoded, results)


@router.post("/score", openapi_extra=IMAGES_BODY, response_model=ScoreResponse, responses=SCORING_ERRORS)
async def score(
    model: ReadableModel,
    request: Request,
    services: Services,
    detectors: Detectors = None,
    threshold: Threshold = None,
    tpr: TargetTPR = None,
) -> Response:
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
    return json_response({"model": model.name, "results": per_image})
