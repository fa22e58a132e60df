"""Outlier Exposure (Hendrycks, Mazeika, Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction
from ood_core.loss.crossentropy import per_entry_cross_entropy


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Cross-entropy from the uniform distribution to the softmax over axis 1:
    :math:`\\log \\sum_c e^{f_c} - \\frac{1}{C} \\sum_c f_c` (minimal, :math:`\\log C`, for uniform logits)."""
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


class OutlierExposureLoss(nn.Module):
    """The loss used in the OE experiments:

    .. math::
        \\mathcal{L}(x, y) = \\begin{cases} -\\log \\sigma_y(f(x)) & y \\geq 0 \\\\
        \\alpha \\left( \\log \\sum_{c=1}^C e^{f(x)_c} - \\frac{1}{C} \\sum_{c=1}^C f(x)_c \\right) & y < 0
        \\end{cases}

    i.e. the cross-entropy of OOD inputs to the uniform distribution. We follow the paper and the authors'
    code (``-(x.mean(1) - logsumexp(x, 1))``); the seed's formula drops the :math:`1/C` and the sign.
    Supports segmentation (``B x C x H x W`` logits, ``B x H x W`` targets). ``mean`` averages over all
    entries (ID and OOD).

    :param alpha: weighting coefficient :math:`\\alpha`
    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(self, alpha: float = 0.5, reduction: str | None = "mean") -> None:
        super().__init__()
        self.alpha = alpha
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """:param logits: class logits; :param target: labels (``< 0`` = OOD)"""
        loss_ce = per_entry_cross_entropy(logits, target)
        loss_oe = torch.where(target < 0, uniform_cross_entropy(logits), torch.zeros_like(loss_ce))
        return apply_reduction(loss_ce + self.alpha * loss_oe, self.reduction)
