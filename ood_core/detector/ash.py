"""Activation shaping (ASH) and the base class shared by the activation-shaping detectors.

Djurisic, Bozanic, Ashok, Liu: "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
ICLR 2023.
"""

from __future__ import annotations

import math
import numbers
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor

from ood_core.api import Detector
from ood_core.detector.scores import resolve_score_function, score_hparams


def check_percentile(value: float, name: str = "percentile") -> float:
    """Validate a percentile given as a fraction in ``[0, 1]`` (not in ``[0, 100]``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def kept_count(n: int, percentile: float) -> int:
    """Number of activations kept: ``k = n - round(n * percentile)`` (round half to even, as ``np.round``
    in the papers' code), at least 1 so that the sums divided by below are never over an empty set."""
    return max(1, n - round(n * percentile))


def top_k_per_sample(x: Tensor, percentile: float) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten ``x`` per sample (``B x n``) and return it with the values and indices of its top-k."""
    if x.dim() < 2:
        raise ValueError(f"activations must be batched (B x ...), got shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1)
    values, indices = torch.topk(flat, kept_count(flat.shape[1], percentile), dim=1)
    return flat, values, indices


def exp_ratio(s1: Tensor, s2: Tensor) -> Tensor:
    """Per-sample factor ``exp(s1 / s2)``; a sample with ``s2 == 0`` (all kept activations zero) gets factor 1
    instead of NaN."""
    safe = torch.where(s2 == 0, torch.ones_like(s2), s2)
    return torch.exp(torch.where(s2 == 0, torch.zeros_like(s1), s1 / safe))


class ActivationShapingDetector(Detector):
    """Base of ASH, ReAct and SCALE: ``score = detector(head(shape(backbone(x))))``.

    The shaping acts per sample on all activations the head receives, flattened (``C*H*W`` for feature
    maps, ``D`` for pooled features). When the head is fully convolutional, ``B x K x H x W`` logits give
    ``B x H x W`` scores (segmentation).

    :param backbone: first part of the network, outputs the activations to shape
    :param head: rest of the network, maps (shaped) activations to logits
    :param detector: maps logits to outlier scores: a callable, or the name of one of
        :data:`ood_core.detector.scores.SCORE_FUNCTION_NAMES`; default ``EnergyBased.score``. Only the
        registered functions can be saved.
    """

    input_kind = "feature_maps"
    supports_segmentation = True
    external_modules = ("backbone", "head")

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.detector = resolve_score_function(detector)

    @abstractmethod
    def shape(self, activations: Tensor) -> Tensor:
        """The shaped activations, same shape as the input."""

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        nets = {name: modules.get(name) for name in cls.external_modules}
        return cls(**nets, **hparams)

    def _score_hparams(self) -> dict[str, Any]:
        """``{"detector": name}``; ``ValueError`` for a custom callable (it cannot be saved)."""
        return score_hparams(type(self).__name__, self.detector)

    def _extract(self, x: Tensor) -> Tensor:
        return self._require("backbone")(x)

    def predict_feature_maps(self, maps: Tensor) -> Tensor:
        """Scores from the backbone's output.

        :param maps: ``B x C x H x W`` feature maps (or ``B x D`` features)
        :return: ``B`` scores, or ``B x H x W`` when the head returns ``B x K x H x W`` logits
        """
        self._check_fitted()
        head = self._require("head")
        with torch.no_grad():
            return self.detector(head(self.shape(maps)))

    def predict_features(self, x: Tensor) -> Tensor:
        """Same as :meth:`predict_feature_maps`, for whatever the head takes (maps or pooled features)."""
        return self.predict_feature_maps(x)


class ASH(ActivationShapingDetector):
    r"""Extremely simple activation shaping: prune the activations, per sample, to the top
    :math:`k = n - \mathrm{round}(n p)` of the :math:`n` flattened activations, modify the rest, then score
    the head's logits (energy by default):

    * ASH-P: keep the top-k, zero the rest;
    * ASH-B: set the top-k to :math:`s_1 / k` (:math:`s_1` = sum before pruning), zero the rest;
    * ASH-S: keep the top-k, zero the rest and multiply by :math:`\exp(s_1 / s_2)`
      (:math:`s_2` = sum after pruning).

    The paper applies ASH to the feature maps before the last average pooling. Unlike pytorch-ood's
    implementation, the input tensor is never modified in place; :math:`k` is at least 1.

    :param variant: ``"ash-s"``, ``"ash-p"`` or ``"ash-b"``
    :param percentile: fraction :math:`p \in [0, 1]` of activations pruned
    """

    variants: tuple[str, ...] = ("ash-s", "ash-p", "ash-b")

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        variant: str = "ash-s",
        percentile: float = 0.65,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__(backbone, head, detector)
        if variant not in self.variants:
            raise ValueError(f"unknown ASH variant {variant!r}; expected one of {', '.join(self.variants)}")
        self.variant = variant
        self.percentile = check_percentile(percentile)

    def hparams(self) -> dict[str, Any]:
        return {"variant": self.variant, "percentile": self.percentile, **self._score_hparams()}

    @staticmethod
    def ash_p(x: Tensor, percentile: float = 0.65) -> Tensor:
        """Keep the top-k activations per sample, zero the rest."""
        flat, values, indices = top_k_per_sample(x, percentile)
        return torch.zeros_like(flat).scatter(1, indices, values).reshape(x.shape)

    @staticmethod
    def ash_b(x: Tensor, percentile: float = 0.65) -> Tensor:
        """Set the top-k activations per sample to ``s1 / k`` (``s1`` = sum of all), zero the rest."""
        flat, values, indices = top_k_per_sample(x, percentile)
        fill = (flat.sum(dim=1, keepdim=True) / values.shape[1]).expand_as(values)
        return torch.zeros_like(flat).scatter(1, indices, fill).reshape(x.shape)

    @staticmethod
    def ash_s(x: Tensor, percentile: float = 0.65) -> Tensor:
        """Keep the top-k activations per sample, zero the rest, multiply by ``exp(s1 / s2)``
        (``s1`` = sum before, ``s2`` = sum after pruning)."""
        flat, values, indices = top_k_per_sample(x, percentile)
        factor = exp_ratio(flat.sum(dim=1), values.sum(dim=1))
        pruned = torch.zeros_like(flat).scatter(1, indices, values) * factor[:, None]
        return pruned.reshape(x.shape)

    def shape(self, activations: Tensor) -> Tensor:
        shaping = {"ash-p": ASH.ash_p, "ash-b": ASH.ash_b, "ash-s": ASH.ash_s}[self.variant]
        return shaping(activations, self.percentile)
