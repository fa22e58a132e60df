"""Entropic Open-Set and Objectosphere losses (Dhamija, Günther, Boult, "Reducing Network Agnostophobia",
NeurIPS 2018); segmentation variant: Chan, Rottmann, Gottschalk, "Entropy Maximization and Meta
Classification for Out-of-Distribution Detection in Semantic Segmentation", ICCV 2021."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_dense_pair, check_reduction
from ood_core.loss.crossentropy import per_entry_cross_entropy


def entropic_open_set(logits: Tensor, target: Tensor) -> Tensor:
    """Per-entry entropic open-set loss in the shape of ``target`` (see :class:`EntropicOpenSetLoss`)."""
    loss_in = per_entry_cross_entropy(logits, target)
    loss_out = -F.log_softmax(logits, dim=1).mean(dim=1)
    return torch.where(target < 0, loss_out, loss_in)


class EntropicOpenSetLoss(nn.Module):
    """Maximizes the entropy of the softmax for OOD inputs:

    .. math::
        \\mathcal{L}(x, y) = \\begin{cases} -\\log \\sigma_y(f(x)) & y \\geq 0 \\\\
        -\\frac{1}{C} \\sum_{c=1}^C \\log \\sigma_c(f(x)) & y < 0 \\end{cases}

    The OOD term has a minus sign as in the paper (the seed drops it); it is minimal (:math:`\\log C`) for a
    uniform softmax. Supports segmentation; ``mean`` averages over all entries.

    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(self, reduction: str | None = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """:param logits: class logits; :param target: labels (``< 0`` = OOD)"""
        return apply_reduction(entropic_open_set(logits, target), self.reduction)


class ObjectosphereLoss(nn.Module):
    """Entropic open-set loss plus a feature-magnitude term:

    .. math::
        \\mathcal{L}(x, y) = \\mathcal{L}_E(x, y) + \\alpha \\begin{cases}
        \\max \\lbrace 0, \\xi - \\lVert F(x) \\rVert_2 \\rbrace^2 & y \\geq 0 \\\\
        \\lVert F(x) \\rVert_2^2 & y < 0 \\end{cases}

    with :math:`F(x)` deep features (``B x D``, or ``B x D x H x W`` for segmentation: norm per pixel).
    ``mean`` averages over all entries.

    :param alpha: weight :math:`\\alpha` of the magnitude term
    :param xi: minimum feature magnitude :math:`\\xi` of ID inputs
    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(self, alpha: float = 1.0, xi: float = 1.0, reduction: str | None = "mean") -> None:
        super().__init__()
        self.alpha = alpha
        self.xi = xi
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
        """:param logits: class logits :math:`f(x)`; :param features: deep features :math:`F(x)`;
        :param target: labels :math:`y`"""
        check_dense_pair(features, target, name="features")
        magnitude = features.norm(p=2, dim=1)
        magnitude_term = torch.where(target < 0, magnitude.pow(2), (self.xi - magnitude).relu().pow(2))
        loss = entropic_open_set(logits, target) + self.alpha * magnitude_term
        return apply_reduction(loss, self.reduction)

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Outlier score: :math:`-\\max_c \\sigma_c(f(x)) \\cdot \\lVert f(x) \\rVert_2` (higher = more OOD)."""
        return -logits.softmax(dim=1).max(dim=1).values * logits.norm(p=2, dim=1)
