"""The Open Inference Protocol (KServe / Triton "V2") over REST: health, server and model metadata, and inference.

``/v2/models/{model}/infer`` takes the ``images`` (``BYTES``) or ``pixels`` (``UINT8`` / ``FP32``) input as JSON or
with the binary tensor data extension (:mod:`service.api.v2_codec`) and answers the outputs of
:mod:`service.api.v2_outputs`. Request ``parameters`` carry ``detectors`` (comma-separated), ``threshold`` and
``tpr``, which mean what ``/v1/models/{model}/score``'s query parameters mean. The path is /v1's: resolve the
detectors and thresholds once, decode (:func:`service.engine.submit.decode_images`, or
:func:`service.engine.tensors.decode_pixels` for pixel tensors), submit to the model's batcher; the values come
finished from the batch worker and this module only puts them into tensors.

Every model has one version, ``1`` (the ``/versions/{version}`` paths accept it, 404 for others). Errors are the
protocol's ``{"error": "..."}`` bodies, with the statuses of the one table in :mod:`service.api.problems` (which
chooses the body by path). Health routes are open like ``/healthz``; the others need a key when
``OOD_REQUIRE_AUTH_FOR_READ=true``, like every read.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import Model, ReadableModel, ReadAccess, ScoringQuery, Services
from service.api.problems import STATUS_DESCRIPTIONS
from service.api.v2_codec import (
    BINARY_EXTENSION,
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH,
    encode_answer,
    image_files,
    numeric_array,
    parse_body,
)
from service.api.v2_outputs import (
    IMAGES_INPUT,
    INPUT_TYPES,
    available_outputs,
    build_outputs,
    input_metadata,
    map_bytes,
    output_metadata,
    select_outputs,
)
from service.api.v2_schemas import (
    V2Error,
    V2InferParameters,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2RequestInput,
    V2ServerLive,
    V2ServerMetadata,
    V2ServerReady,
)
from service.engine import submit, tensors
from service.engine.served_model import ServedModel
from service.errors import BadRequestError, ModelNotFoundError, NotReadyError, ResponseTooLargeError, TooManyImagesError

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])
SERVER_NAME = "ood-serve"
MODEL_VERSION = "1"
PLATFORM = "pytorch"
INLINE_ENCODE_ELEMENTS = 65536
"""Answers with more output elements than this are encoded in the thread pool (segmentation maps)."""


def v2_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each status answers a :class:`V2Error` body (500 is added to every route), and
    so does any other client error (``4XX``, which also keeps FastAPI from declaring its 422 body: under ``/v2`` a
    422 of the table is answered as 400)."""
    declared: dict[int | str, dict[str, Any]] = {
        status: {"description": STATUS_DESCRIPTIONS[status], "model": V2Error} for status in sorted({*statuses, 500})
    }
    declared["4XX"] = {"description": "Any other client error (e.g. 401 / 403 / 429 of read keys)", "model": V2Error}
    return declared


Version = Annotated[str, Path(description=f"the model version (every model has one: {MODEL_VERSION})")]
MODEL_ERRORS = v2_errors(400, 404, 503)
INFER_BODY: dict[str, object] = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "binary tensor data extension: the byte length of the JSON header that starts the body",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
            BINARY_MEDIA_TYPE: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"V2InferRequest JSON ({HEADER_LENGTH} bytes), then the inputs' binary data",
                }
            },
        },
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs (application/octet-stream: with binary data after the JSON header, whose "
        f"length is in the {HEADER_LENGTH} header)",
        "content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            HEADER_LENGTH: {
                "description": "with binary outputs: the byte length of the JSON header that starts the body",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    },
    **v2_errors(400, 404, 408, 413, 429, 503, 504),
}


def check_version(model: ServedModel, version: str | None) -> None:
    if version is not None and version != MODEL_VERSION:
        raise ModelNotFoundError(
            f"model {model.name!r} has no version {version[:64]!r}; its only version is {MODEL_VERSION!r}"
        )


@router.get("", response_model=V2ServerMetadata, responses=v2_errors())
async def server_metadata(request: Request, _: ReadAccess) -> V2ServerMetadata:
    """The server's name, version and protocol extensions."""
    return V2ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=[BINARY_EXTENSION])


@router.get("/health/live", response_model=V2ServerLive, responses=v2_errors(503))
async def server_live(services: Services) -> V2ServerLive:
    """Liveness (a Kubernetes livenessProbe): the process serves and start-up has not failed."""
    if services.catalog.failure is not None:
        raise NotReadyError(services.catalog.failure)
    return V2ServerLive(live=True)


@router.get("/health/ready", response_model=V2ServerReady, responses=v2_errors(503))
async def server_ready(services: Services) -> V2ServerReady:
    """Readiness (a Kubernetes readinessProbe): every model, its states and its warm-up batch are done."""
    services.catalog.require_ready()
    return V2ServerReady(ready=True)


def model_metadata(model: ServedModel) -> V2ModelMetadata:
    return V2ModelMetadata(
        name=model.name,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=input_metadata(model),
        outputs=output_metadata(model),
    )


@router.get("/models/{model}", response_model=V2ModelMetadata, responses=MODEL_ERRORS)
async def get_model_metadata(_: ReadAccess, model: Model) -> V2ModelMetadata:
    """Inputs (send one of them) and the outputs of the active detectors."""
    return model_metadata(model)


@router.get("/models/{model}/versions/{version}", response_model=V2ModelMetadata, responses=MODEL_ERRORS)
async def get_model_version_metadata(_: ReadAccess, model: Model, version: Version) -> V2ModelMetadata:
    check_version(model, version)
    return model_metadata(model)


@router.get("/models/{model}/ready", response_model=V2ModelReady, responses=MODEL_ERRORS)
async def model_ready(_: ReadAccess, model: Model) -> V2ModelReady:
    """A model is ready once the service is (503 before)."""
    return V2ModelReady(name=model.name, ready=True)


@router.get("/models/{model}/versions/{version}/ready", response_model=V2ModelReady, responses=MODEL_ERRORS)
async def model_version_ready(_: ReadAccess, model: Model, version: Version) -> V2ModelReady:
    check_version(model, version)
    return V2ModelReady(name=model.name, ready=True)


@router.post(
    "/models/{model}/infer", openapi_extra=INFER_BODY, response_model=V2InferResponse, responses=INFER_RESPONSES
)
async def infer(model: ReadableModel, request: Request, services: Services) -> Response:
    """Score the ``images`` or ``pixels`` input (see the module docstring for the outputs)."""
    return await run_infer(model, request, services)


@router.post(
    "/models/{model}/versions/{version}/infer",
    openapi_extra=INFER_BODY,
    response_model=V2InferResponse,
    responses=INFER_RESPONSES,
)
async def infer_version(model: ReadableModel, version: Version, request: Request, services: Services) -> Response:
    check_version(model, version)
    return await run_infer(model, request, services)


def image_input(request: V2InferRequest) -> V2RequestInput:
    """The one input of the request, with its name, datatype and rank checked."""
    accepted = " or ".join(f"{name} ({'/'.join(types)})" for name, types in INPUT_TYPES.items())
    if len(request.inputs) != 1:
        names = ", ".join(repr(t.name[:64]) for t in request.inputs[:5])
        raise BadRequestError(f"send exactly one input, {accepted}; got {len(request.inputs)}: {names}")
    tensor = request.inputs[0]
    if tensor.name not in INPUT_TYPES:
        raise BadRequestError(f"unknown input {tensor.name[:64]!r}; the inputs are {accepted}")
    if tensor.datatype not in INPUT_TYPES[tensor.name]:
        raise BadRequestError(
            f"input {tensor.name!r} must be {'/'.join(INPUT_TYPES[tensor.name])}, got {tensor.datatype}"
        )
    rank = 1 if tensor.name == IMAGES_INPUT else 4
    if len(tensor.shape) != rank:
        wanted = "[N]" if rank == 1 else "[N, C, H, W]"
        raise BadRequestError(f"input {tensor.name!r} must have shape {wanted}, got {tensor.shape}")
    if tensor.shape[0] < 1:
        raise BadRequestError(f"input {tensor.name!r} has no images (shape {tensor.shape})")
    return tensor


async def run_infer(model: ServedModel, request: Request, services: Services) -> Response:
    """parse -> resolve (detectors, thresholds, outputs) -> decode -> submit -> output tensors -> encode."""
    settings = services.settings
    body = parse_body(await request.body(), request.headers.get(HEADER_LENGTH))
    infer_request = body.request
    params = infer_request.parameters or V2InferParameters.model_validate({})
    query = ScoringQuery.parse(params.detectors, params.threshold, params.tpr)
    detectors = submit.resolve(model, model.task, "/infer", query.detectors, query.threshold, query.tpr)
    available = available_outputs(model, detectors, query.threshold)
    selected = select_outputs(model, available, infer_request.outputs, params.binary_data_output)
    tensor = image_input(infer_request)
    count = tensor.shape[0]
    if count > settings.max_images_per_request:
        raise TooManyImagesError(f"{count} images in one request; the limit is {settings.max_images_per_request}")
    estimate = map_bytes(model, selected, count)
    if estimate > settings.max_response_bytes:
        raise ResponseTooLargeError(
            f"{count} image(s) of per-pixel score outputs would be about {estimate / 2**20:.1f} MiB, over the response "
            f"limit of {settings.max_response_bytes / 2**20:.1f} MiB; send fewer images or ask for binary_data"
        )
    if tensor.name == IMAGES_INPUT:
        files = image_files(tensor, body.binary[0])
        decoded = await submit.decode_images(model, files, settings.max_pixels)
    else:
        decoded = await tensors.decode_pixels(model, numeric_array(tensor, body.binary[0]), settings.max_pixels)
    results = await submit.submit(model, decoded, detectors, query.threshold, query.tpr)
    outputs = build_outputs(model, detectors, results, [name for name, _ in selected])
    head: dict[str, Any] = {"model_name": model.name, "model_version": MODEL_VERSION}
    if infer_request.id is not None:
        head["id"] = infer_request.id
    answer = [(outputs[name], binary) for name, binary in selected]
    if sum(output.array.size for output, _ in answer) <= INLINE_ENCODE_ELEMENTS:
        content, headers = encode_answer(head, answer)
    else:
        content, headers = await run_in_threadpool(encode_answer, head, answer)
    return Response(content, headers=headers)
