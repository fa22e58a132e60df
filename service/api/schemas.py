"""Every request body and response shape of the HTTP API, as pydantic models: ``/openapi.json`` is generated
from them, and a test validates real answers of every route against it.

The scoring routes build their JSON from the batch worker's finished entries (no pydantic on the hot path); the
models here are the contract those entries are tested against.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """An error (RFC 9457 ``application/problem+json``)."""

    type: str = Field("about:blank", description="always about:blank: the title says what kind of error")
    title: str = Field(description="short, fixed per kind of error")
    status: int = Field(description="the HTTP status")
    detail: str = Field(description="what was wrong with this request")
    instance: str = Field(description="the request path")
    request_id: str | None = Field(None, description="the request's X-Request-ID, to find it in the logs")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    models: list[str]


class ModelInfo(BaseModel):
    name: str
    task: Literal["classification", "segmentation"]
    classes: list[str] = Field(description="class labels, by class index")
    input_size: Annotated[list[int], Field(min_length=2, max_length=2, description="network input [height, width]")]
    device: str
    detectors: list[str] = Field(description="names of the active detectors")


class ModelList(BaseModel):
    models: list[ModelInfo]


class DetectorInfo(BaseModel):
    """An active detector state."""

    name: str
    version: int = Field(description="grows by one with every upload or fit of this name")
    sha256: str = Field(description="of the state file (also its download's ETag)")
    size_bytes: int
    detector_class: str
    uploaded_at: str = Field(description="UTC, ISO 8601")
    input_kind: Literal["logits", "features", "feature_maps"]
    calibrated: bool = Field(description="the state holds calibration scores (thresholds and p-values)")
    default_threshold: float | None = Field(description="threshold at the calibration's target TPR")
    target_tpr: float | None


class DetectorList(BaseModel):
    model: str
    detectors: list[DetectorInfo]


class Prediction(BaseModel):
    index: int | None = Field(description="predicted class index")
    label: str | None
    probability: float | None = Field(description="softmax probability of the predicted class")


class Verdict(BaseModel):
    """One detector's verdict on one image."""

    score: float | None = Field(description="outlier score, higher = more OOD (null when not finite)")
    threshold: float | None = Field(description="the threshold used (null: no calibration and none given)")
    is_ood: bool | None = Field(description="score > threshold")
    p_value: float | None = Field(description="conformal p-value (1 + #{calibration >= score}) / (n + 1)")
    version: int = Field(description="version of the detector state that scored")


class ImageScore(BaseModel):
    prediction: Prediction
    detectors: dict[str, Verdict]


class ScoreResponse(BaseModel):
    model: str
    results: list[ImageScore] = Field(description="one per image, in request order")


class MapShape(BaseModel):
    height: int = Field(description="rows of the map (?size=: the model's input size by default)")
    width: int


class PngMap(MapShape):
    """16-bit grayscale PNG, base64: ``score = min + level / 65535 * (max - min)``."""

    format: Literal["png"]
    bits: Literal[16]
    min: float
    max: float
    data: str


class NpyMap(MapShape):
    """float16 ``.npy`` array (rows x columns), base64."""

    format: Literal["npy"]
    dtype: Literal["float16"]
    data: str


class JsonMap(MapShape):
    """Nested lists (rows); non-finite scores are null."""

    format: Literal["json"]
    data: list[list[float | None]]


AnomalyMap = Annotated[PngMap | NpyMap | JsonMap, Field(discriminator="format")]


class PixelVerdict(BaseModel):
    """One detector's per-pixel scores of one image."""

    threshold: float | None
    ood_share: float | None = Field(description="share of pixels with score > threshold (null without one)")
    max_score: float | None
    version: int
    map: AnomalyMap


class ImageSegment(BaseModel):
    height: int = Field(description="of the image as sent (the maps have this size)")
    width: int
    detectors: dict[str, PixelVerdict]


class SegmentResponse(BaseModel):
    model: str
    results: list[ImageSegment]


class Instance(BaseModel):
    model_config = ConfigDict(extra="allow")

    b64: str = Field(json_schema_extra={"format": "byte"}, description="the encoded image, base64")


class InstancesBody(BaseModel):
    """JSON image body of ``/score`` and ``/segment``."""

    instances: list[Instance] = Field(min_length=1)


class LabelledInstance(Instance):
    label: int = Field(description="class index; < 0 marks an OOD image")


class FitBody(BaseModel):
    """JSON body of ``/fit``."""

    detector_class: str = Field(description="an ood_core detector class, e.g. Mahalanobis")
    hparams: dict[str, object] = Field(default_factory=dict, description="constructor arguments")
    calibration_share: float | None = Field(None, gt=0, lt=1, description="share of ID images held out")
    instances: list[LabelledInstance] = Field(min_length=2, description="at least one image to fit, one to calibrate")


IMAGES_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["files"],
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/InstancesBody"}},
        },
    }
}
"""OpenAPI request body of ``/score`` and ``/segment`` (the routes read the body themselves, for the limits)."""

FIT_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 2},
                        "labels": {"type": "string", "description": "comma-separated class indices, < 0 = OOD"},
                        "detector_class": {"type": "string"},
                        "hparams": {"type": "string", "description": "JSON object"},
                        "calibration_share": {"type": "number"},
                    },
                    "required": ["files", "labels", "detector_class"],
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/FitBody"}},
        },
    }
}

STATE_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
"""OpenAPI request body of a state upload: the ``save_detector`` safetensors file."""

BODY_MODELS: tuple[type[BaseModel], ...] = (Problem, InstancesBody, FitBody)
"""Models referenced only from the hand-written request bodies above: added to ``components`` explicitly."""
