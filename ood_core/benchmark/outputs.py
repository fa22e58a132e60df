"""Network outputs of the digits benchmark, computed once per data set, and how detectors consume them.

:func:`classifier_outputs` runs the classifier's stages in sequence and keeps every output a detector may take:
logits, pooled features, the last feature maps, the pooled output of each stage (MultiMahalanobis) and the
unpooled output of each stage (Gram). Detectors are fitted and scored on them through ``fit_features`` /
``predict_features`` (:func:`fit_detector`, :func:`scores_of`); only detectors of ``input_kind`` ``"input"``
run the network themselves, through ``fit`` / ``predict`` on the images (MCD on the pre-dropout maps, see
:func:`ood_core.benchmark.factories.dropout_tail`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ood_core.api import Detector
from ood_core.zoo import DigitsCNN, DigitsSegmenter, normalize

STAGE_ENDS = (3, 8, None)
"""``body[:3]``, ``body[:8]``, ``body``: after the first and second max-pooling and the last conv (+ dropout)."""


@dataclass
class Outputs:
    """One data set through a network: normalized inputs, labels and every network output."""

    x: Tensor
    y: Tensor
    logits: Tensor
    features: Tensor
    maps: Tensor
    layers: list[Tensor]
    """Globally pooled output of each stage (``B x C_l``)."""
    stage_maps: list[Tensor] = field(default_factory=list)
    """Unpooled output of each stage (``B x C_l x H_l x W_l``)."""

    def for_detector(self, det: Detector) -> Any:
        """What ``predict_features`` / ``fit_features`` of ``det`` take (Gram: the unpooled stage maps)."""
        kind = det.input_kind
        if kind == "multi_features":
            return self.stage_maps if type(det).__name__ == "Gram" else self.layers
        return {"logits": self.logits, "features": self.features, "feature_maps": self.maps}[kind]

    def batches(self, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches of the inputs (a loader for ``fit``)."""
        yield from zip(self.x.split(batch_size), self.y.split(batch_size), strict=True)


def stages(model: DigitsCNN) -> list[nn.Sequential]:
    """The body's three stages (:data:`STAGE_ENDS`), each applied to the previous one's output: the consecutive
    layers of MultiMahalanobis and Gram."""
    starts = (0, *(end for end in STAGE_ENDS if end is not None))
    return [model.body[start:end] for start, end in zip(starts, STAGE_ENDS, strict=True)]


def stage_outputs(model: DigitsCNN) -> list[nn.Module]:
    """The last module of each stage: its output is the stage's output (for detectors that hook layers of the
    network itself, NACUE)."""
    return [model.body[(end or len(model.body)) - 1] for end in STAGE_ENDS]


def layer_taps(model: DigitsCNN) -> list[nn.Module]:
    """Input -> globally pooled activations after each stage of the body (16, 32, 64 channels): what
    :attr:`Outputs.layers` holds (MultiMahalanobis averages its layers' maps over space the same way)."""
    return [nn.Sequential(model.body[:end], model.pool) for end in STAGE_ENDS]


@torch.no_grad()
def classifier_outputs(model: DigitsCNN, images: Tensor, labels: Tensor) -> Outputs:
    """Every output the detectors need, from one pass (the stages of :func:`stages` run in sequence)."""
    h = x = normalize(images.to(next(model.parameters()).device))
    layers, stage_maps = [], []
    for stage in stages(model):
        h = stage(h)
        stage_maps.append(h)
        layers.append(model.pool(h))
    maps, features = h, layers[-1]
    return Outputs(x, labels.to(x.device), model.fc(features), features, maps, layers, stage_maps)


def segmenter_head(segmenter: DigitsSegmenter) -> Callable[[Tensor], Tensor]:
    """Feature maps -> full-resolution logits (the part of the segmenter after ``body``)."""
    return nn.Sequential(segmenter.head, segmenter.upsample)


def fit_labels(det: Detector, out: Outputs) -> Tensor:
    """Labels for ``fit_features``: per pixel for logits, per image (all ID) for segmentation feature maps."""
    if out.y.dim() > 1 and det.input_kind == "feature_maps":
        return torch.zeros(len(out.y), dtype=torch.long, device=out.y.device)
    return out.y


def fit_detector(det: Detector, out: Outputs) -> None:
    """Fit ``det`` (when it needs it): on the precomputed outputs, or on the images for ``"input"`` kinds."""
    if not det.requires_fit:
        return
    if det.input_kind == "input":
        det.fit(out.batches())
    else:
        det.fit_features(out.for_detector(det), fit_labels(det, out))


def scores_of(det: Detector, out: Outputs, batch_size: int = 256) -> Tensor:
    """Outlier scores of one data set: from the precomputed outputs, or through ``predict`` for "input" kinds
    (MCD on the pre-dropout maps, see the package docstring)."""
    if det.input_kind != "input":
        with torch.no_grad():
            return det.predict_features(out.for_detector(det))
    inputs = out.maps if type(det).__name__ == "MCD" else out.x
    return torch.cat([det.predict(x) for x in inputs.split(batch_size)])
