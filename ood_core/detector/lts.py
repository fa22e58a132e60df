"""LTS: logit scaling.

Djurisic, Liu, Bozanic, Liu: "Logit Scaling for Out-of-Distribution Detection", Machine Vision and
Applications 2025 (arXiv:2409.01175; code: github.com/andrijazz/lts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ood_core.detector.ash import check_percentile, kept_count
from ood_core.detector.head_features import HeadFeaturesDetector
from ood_core.detector.scores import resolve_score_function, score_hparams


class LTS(HeadFeaturesDetector):
    r"""Score the head's logits multiplied by a per-sample factor computed from the features (energy by
    default):

    .. math:: s(z) = \mathrm{detector}\big(S(z)\, \mathrm{head}(z)\big), \qquad
        S(z) = \left(\frac{\sum_{i=1}^{D} \max(0, z_i)}{\sum_{j \in \text{top-}k} \max(0, z_j)}\right)^2

    with :math:`k = \max(1, D - \mathrm{round}((1-p) D))` the number of largest activations in the fraction
    :math:`p` (Djurisic et al. 2025): the ratio of the total activation mass to that of the top activations
    differs between ID and OOD samples, and scaling the logits by its square widens the gap of the energy.
    The ReLU is the official code's (it matters only for features that can be negative); the head receives
    the unmodified features. No fitting. Features of any shape ``B x ...`` are flattened per sample for
    :math:`S` (pytorch-ood accepts ``B x D`` only), the head receives them as they are. A sample without
    positive activations (``0 / 0``) gets :math:`S = 1` instead of NaN.

    :param encoder: network mapping inputs to features (may be ``None`` for the ``*_features`` methods)
    :param head: maps features to ``B x C`` logits
    :param p: fraction :math:`p \in [0, 1]` of the activations in the top-k
    :param detector: maps the scaled logits to scores: a callable or a name of
        :data:`ood_core.detector.scores.SCORE_FUNCTION_NAMES`; only the registered ones can be saved
    """

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        p: float = 0.05,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__(encoder, head)
        self.p = check_percentile(p, "p")
        self.detector = resolve_score_function(detector)

    def hparams(self) -> dict[str, Any]:
        return score_hparams("LTS", self.detector, p=self.p)

    @staticmethod
    def scaling_factor(z: Tensor, p: float) -> Tensor:
        """:math:`S(z)` per sample of ``B x ...`` features (flattened): ``B`` factors."""
        if z.dim() < 2:
            raise ValueError(f"LTS expects batched features (B x D), got shape {tuple(z.shape)}")
        active = z.flatten(1).relu()
        top = active.topk(kept_count(active.shape[1], 1.0 - p), dim=1).values.sum(dim=1)
        ratio = active.sum(dim=1) / torch.where(top == 0, torch.ones_like(top), top)
        return torch.where(top == 0, torch.ones_like(ratio), ratio).square()

    def predict_features(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` features; returns ``B`` scores"""
        z = z.detach()
        factor = self.scaling_factor(z, self.p)
        logits = self.logits(z)
        with torch.no_grad():
            return self.detector(logits * factor.reshape(-1, *([1] * (logits.dim() - 1))).to(logits.dtype))
