"""The Open Inference Protocol (KServe / Triton "V2") REST bodies as pydantic models, so ``/openapi.json`` states
them exactly; field names and meanings are the protocol's (``kserve/open-inference-protocol``,
``specification/protocol/inference_rest.md``) and the binary tensor data extension's (Triton,
``docs/protocol/extension_binary_data.md``).

The infer route validates the JSON header of a request with :class:`V2InferRequest` (the binary extension's tensor
bytes follow it in the body, so FastAPI cannot parse the body itself); the answers are built as plain dicts and
these models are their contract (``tests/service/api/test_openapi.py`` validates real answers against them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
"""The protocol's tensor element types (of which the service reads ``BYTES``, ``UINT8`` and ``FP32``)."""

ParameterValue = bool | int | float | str
"""A ``$parameter`` value: ``$string``, ``$number`` or ``$boolean``."""

STRICT = ConfigDict(strict=True)
"""Request bodies are validated strictly (no ``"1"`` for 1): what the schema does not allow is a 400."""

Dimension = Annotated[int, Field(ge=0, description="a dimension (unsigned)")]
MetadataDimension = Annotated[int, Field(ge=-1, description="a dimension; -1: variable")]


class V2Error(BaseModel):
    """Every error under ``/v2`` (the protocol's ``$..._error_response``)."""

    error: str = Field(description="what was wrong (the same detail as /v1's problem bodies)")


class V2ServerMetadata(BaseModel):
    name: str = Field(description="the server: ood-serve")
    version: str
    extensions: list[str] = Field(description="protocol extensions served: binary_tensor_data")


class V2ServerLive(BaseModel):
    live: bool


class V2ServerReady(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[MetadataDimension]


class V2ModelMetadata(BaseModel):
    """A model's inputs (send exactly one of them) and the outputs of its active detectors."""

    name: str
    versions: list[str] = Field(description="the model's versions (one: '1')")
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2InferParameters(BaseModel):
    """Request ``parameters``: the service's own (the /v1 score query's) and the binary extension's; other
    parameters (Triton's ``priority``, ``timeout``, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, ParameterValue] = Field(init=False)  # type: ignore[assignment]

    detectors: str | None = Field(None, description="comma-separated detector names (default: all active)")
    threshold: float | None = Field(
        None, allow_inf_nan=False, description="absolute threshold for every detector (overrides tpr)"
    )
    tpr: float | None = Field(None, gt=0.0, le=1.0, description="ID true-positive rate for the threshold")
    binary_data_output: bool | None = Field(None, description="every output as binary data (binary extension)")


class V2InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, ParameterValue] = Field(init=False)  # type: ignore[assignment]

    binary_data_size: int | None = Field(
        None, ge=0, description="the tensor's bytes follow the JSON header (binary extension)"
    )


class V2RequestInput(BaseModel):
    """An input tensor: ``images`` (``BYTES``, shape ``[N]``: encoded image files; base64 strings in JSON, raw in
    binary) or ``pixels`` (``UINT8`` levels or ``FP32`` intensities in [0, 1], ``[N, C, H, W]``, C = 1 or 3,
    before the model's normalization)."""

    model_config = STRICT

    name: str
    shape: list[Dimension]
    datatype: Datatype
    parameters: V2InputParameters | None = None
    data: list[Any] | None = Field(None, description="row-major elements, flat or nested (absent with binary data)")


class V2OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, ParameterValue] = Field(init=False)  # type: ignore[assignment]

    binary_data: bool | None = Field(None, description="this output as binary data (overrides binary_data_output)")


class V2RequestOutput(BaseModel):
    model_config = STRICT

    name: str
    parameters: V2OutputParameters | None = None


class V2InferRequest(BaseModel):
    """The JSON of an infer request (with the binary extension: its first ``Inference-Header-Content-Length``
    bytes)."""

    model_config = STRICT

    id: str | None = Field(None, description="echoed in the answer")
    parameters: V2InferParameters | None = None
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = Field(None, description="the outputs to answer (default: all)")


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[Dimension]
    datatype: Datatype
    parameters: dict[str, ParameterValue] | None = Field(
        None, description="binary_data_size (binary extension), detector_version (detector outputs)"
    )
    data: list[Any] | None = Field(None, description="flat, row-major (absent with binary data); NaN is null")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it gave one")
    outputs: list[V2ResponseOutput]


V2_BODY_MODELS: tuple[type[BaseModel], ...] = (V2InferRequest,)
"""Models referenced only from the hand-written request body of ``/infer``: added to ``components``."""
