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
    input_kind: Literal["logits", "features", "feature_maps", "multi_features", "input"] = Field(
        description="what the detector reads: one network output, several layers' outputs (multi_features) or the "
        "preprocessed input, running the network itself (input)"
    )
    calibrated: bool = Field(description="the state holds calibration scores (thresholds and p-values)")
    default_threshold: float | None = Field(description="threshold at the calibration's target TPR")
    target_tpr: float | None
    calibration_size: int | None = Field(default=None, description="calibration scores the threshold comes from")
    warnings: list[str] = Field(
        default_factory=list, description="e.g. a calibration set too small for its target TPR to mean anything"
    )


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


class DetectorDrift(BaseModel):
    """One detector's drift window and its two tests (``service.engine.drift``; test fields null while empty)."""

    version: int = Field(description="the detector state version the window belongs to (a new one starts empty)")
    window: int = Field(description="window size: the last OOD_DRIFT_WINDOW scored images")
    filled: int = Field(description="images in the window")
    calibration_size: int | None = Field(description="n, the calibration scores the p-values come from")
    target_tpr: float | None = Field(description="TPR of the default threshold")
    ood_share: float | None = Field(description="share of the window OOD at the default threshold")
    expected_share: float | None = Field(description="(n - ceil(tpr n) + 1) / (n + 1), about 1 - tpr")
    share_p_value: float | None = Field(description="exact one-sided test of the OOD count (beta-binomial)")
    ks_statistic: float | None = Field(description="Kolmogorov-Smirnov distance of the p-values to uniform")
    ks_p_value: float | None = Field(description="KS test p-value (two-sample null: window vs calibration)")
    drifting: bool = Field(description="a p-value is below OOD_DRIFT_ALPHA")
    note: str | None = Field(None, description="why nothing is tested (segmentation, no calibration)")


class DriftResponse(BaseModel):
    model: str
    alpha: float = Field(description="OOD_DRIFT_ALPHA")
    detectors: dict[str, DetectorDrift]


class Instance(BaseModel):
    model_config = ConfigDict(extra="allow")

    b64: str = Field(json_schema_extra={"format": "byte"}, description="the encoded image, base64")


class InstancesBody(BaseModel):
    """JSON image body of ``/score`` and ``/segment``."""

    instances: list[Instance] = Field(min_length=1)


class LabelledInstance(Instance):
    label: int = Field(description="class index; < 0 marks an OOD image")


class FitBody(BaseModel):
    """JSON body of ``/fit``: the data as ``source`` (a path under ``OOD_FIT_DATA_ROOT``) or ``instances``, and the
    job's parameters (each may come in the query instead)."""

    detector_class: str = Field(description="an ood_core detector class, e.g. Mahalanobis")
    hparams: dict[str, object] = Field(default_factory=dict, description="constructor arguments")
    calibration_share: float | None = Field(None, gt=0, lt=1, description="share of each class's ID images held out")
    tpr: float | None = Field(None, gt=0, lt=1, description="target ID true-positive rate (default 0.95)")
    seed: int | None = Field(None, ge=0, description="seeds the calibration hold-out")
    skip_invalid: bool | None = Field(None, description="skip undecodable images instead of failing the job")
    batch_size: int | None = Field(None, ge=1, le=4096, description="images per forward")
    source: str | None = Field(
        None, description="a folder, archive or WebDataset shard pattern relative to OOD_FIT_DATA_ROOT"
    )
    instances: list[LabelledInstance] | None = Field(
        None, min_length=2, description="images with labels: at least one to fit, one to calibrate"
    )


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

_ARCHIVE = {"type": "string", "format": "binary", "description": "class folders <class>/<image> (+ ood/)"}
FIT_BODY: dict[str, object] = {
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (
            ("detector_class", {"type": "string"}),
            ("hparams", {"type": "string", "description": "JSON object"}),
            ("calibration_share", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
            ("tpr", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
            ("seed", {"type": "integer", "minimum": 0}),
            ("skip_invalid", {"type": "boolean"}),
            ("batch_size", {"type": "integer", "minimum": 1, "maximum": 4096}),
        )
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/zip": {"schema": _ARCHIVE},
            "application/x-tar": {"schema": _ARCHIVE},
            "application/gzip": {"schema": _ARCHIVE},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "description": "an archive or outputs safetensors"}
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {**_ARCHIVE, "description": "an archive (or outputs safetensors), streamed to disk"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 2},
                        "labels": {"type": "string", "description": "comma-separated class indices, < 0 = OOD"},
                        "detector_class": {"type": "string"},
                        "hparams": {"type": "string", "description": "JSON object"},
                        "calibration_share": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                        "tpr": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                        "seed": {"type": "integer", "minimum": 0},
                        "skip_invalid": {"type": "boolean"},
                        "batch_size": {"type": "integer", "minimum": 1, "maximum": 4096},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/FitBody"}},
        },
    },
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
