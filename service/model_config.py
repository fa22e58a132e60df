"""What one served network is: :class:`ModelConfig` (architecture, weights, task, classes, input size) with its
:class:`PreprocessConfig`, :class:`NodesConfig` (the graph nodes of its outputs) and :class:`HeadsConfig`; the
``models`` entries of :class:`~service.settings.Settings`. Every model forbids unknown keys: a misspelt key in the
config file is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.names import is_valid_name

Size = tuple[int, int]
Autocast = bool | Literal["bfloat16", "float16"]
"""``false``, ``true`` (the device's usual dtype) or a dtype name."""


def _size(value: Any) -> Any:
    return (value, value) if isinstance(value, int) else value


class PreprocessConfig(BaseModel):
    """Image -> network input: convert to ``mode``, resize, center-crop, scale to [0, 1], ``(x - mean) / std``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in the config file is an error, not ignored

    mode: Literal["L", "RGB"] = "RGB"
    resize: Size | None = None
    """Resize to (height, width) before cropping; ``None``: resize straight to the model's input size."""
    crop: Size | None = None
    """Center crop (height, width) after resizing; ``None``: no crop."""
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])

    _coerce = field_validator("resize", "crop", mode="before")(_size)

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        channels = 1 if self.mode == "L" else 3
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, channels):
                raise ValueError(f"{key} needs 1 or {channels} values for mode {self.mode}, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class NodesConfig(BaseModel):
    """Graph nodes (``torchvision.models.feature_extraction`` names) giving each network output."""

    model_config = ConfigDict(extra="forbid")

    logits: str
    features: str | None = None
    feature_maps: str | None = None
    layers: list[str] = Field(default_factory=list)
    """Feature-map nodes of several layers, in order, returned by the same forward (``Gram``, ``MultiMahalanobis``;
    ``NACUE``'s layers); each node at most once (one may also be ``features`` / ``feature_maps``)."""

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: list[str]) -> list[str]:
        if (problem := repeated_layer(value)) is not None:
            raise ValueError(problem)
        return value


def repeated_layer(layers: list[str]) -> str | None:
    """What is wrong when a ``nodes.layers`` list names a node twice, else ``None``."""
    first: dict[str, int] = {}
    for index, node in enumerate(layers):
        if node in first:
            return f"layer {node!r} is named twice (entries {first[node]} and {index}); name each node once"
        first[node] = index
    return None


class HeadsConfig(BaseModel):
    """Submodule names chained to map features / feature maps to logits (detectors such as ReAct need them);
    a 4-D tensor is flattened before an ``nn.Linear``."""

    model_config = ConfigDict(extra="forbid")

    features: list[str] = Field(default_factory=list)
    feature_maps: list[str] = Field(default_factory=list)


class ModelConfig(BaseModel):
    """One served network."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: Literal["zoo", "torchvision"] = "torchvision"
    architecture: str
    """``digits-classifier`` / ``digits-segmenter`` for the zoo; a torchvision builder name otherwise."""
    weights: Path | None = None
    """safetensors file with the network's ``state_dict`` (zoo: default shipped weights when omitted)."""
    task: Literal["classification", "segmentation"] = "classification"
    num_classes: int = Field(gt=0)
    labels: list[str] | None = None
    input_size: Size
    preprocessing: PreprocessConfig = Field(default_factory=PreprocessConfig)
    nodes: NodesConfig
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    device: str | None = None
    autocast: Autocast | None = None
    max_batch_size: int | None = Field(default=None, gt=0)
    max_wait_ms: float | None = Field(default=None, ge=0)
    channels_last: bool | None = None
    compile: bool | None = None

    _coerce = field_validator("input_size", mode="before")(_size)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(f"invalid model name {value!r}: use letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _labels(self) -> ModelConfig:
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels given for {self.num_classes} classes")
        return self

    @property
    def class_labels(self) -> list[str]:
        return self.labels if self.labels is not None else [str(i) for i in range(self.num_classes)]
