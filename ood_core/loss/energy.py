"""Energy-bounded learning (Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction
from ood_core.loss.crossentropy import per_entry_cross_entropy


def free_energy(logits: Tensor) -> Tensor:
    """:math:`E(x) = -\\log \\sum_i e^{f_i(x)}` over axis 1."""
    return -torch.logsumexp(logits, dim=1)


class EnergyRegularizedLoss(nn.Module):
    """Cross-entropy on ID inputs plus a squared-hinge energy regularizer (Liu et al. 2020, Eq. 6):

    .. math::
        \\mathcal{L} = \\mathbb{E}_{x \\sim \\mathcal{D}_{in}} \\left[ -\\log \\sigma_y(f(x))
        + \\alpha \\max(0, E(x) - m_{in})^2 \\right]
        + \\alpha \\, \\mathbb{E}_{x \\sim \\mathcal{D}_{out}} \\left[ \\max(0, m_{out} - E(x))^2 \\right]

    with :math:`E(x) = -\\log \\sum_i e^{f_i(x)}`; targets ``< 0`` mark OOD samples. The per-sample terms
    (``reduction="none"``) are :math:`-\\log \\sigma_y(f(x)) + \\alpha \\max(0, E(x) - m_{in})^2` for ID and
    :math:`\\alpha \\max(0, m_{out} - E(x))^2` for OOD samples; ``"sum"`` adds them up. ``"mean"`` takes each
    expectation over its own samples, as the paper does: the mean of the ID terms over the ID samples plus
    the mean of the OOD terms over the OOD samples (a missing group contributes ``0``). A single mean over
    the batch would instead weight each part by its share of the batch.

    This is the paper's (and seed's) energy; pytorch-ood's code uses :math:`+\\log\\sum` and applies the OOD
    margin inside the logits. The paper uses :math:`m_{in} = -25, m_{out} = -7, \\alpha = 0.1` on CIFAR; the
    defaults here are the seed's. Segmentation (``B x C x H x W`` logits, ``B x H x W`` targets): every pixel
    is a sample.

    :param alpha: weight :math:`\\alpha` of the regularizer
    :param margin_in: energy margin :math:`m_{in}` for ID data
    :param margin_out: energy margin :math:`m_{out}` for OOD data
    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(
        self, alpha: float = 1.0, margin_in: float = -1.0, margin_out: float = -1.0, reduction: str | None = "mean"
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.margin_in = margin_in
        self.margin_out = margin_out
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """:param logits: logits; :param targets: labels (``< 0`` = OOD)"""
        nll = per_entry_cross_entropy(logits, targets)
        energy = free_energy(logits)
        known = targets >= 0
        regularization = torch.where(
            known, (energy - self.margin_in).relu().pow(2), (self.margin_out - energy).relu().pow(2)
        )
        loss = nll + self.alpha * regularization
        if self.reduction != "mean":
            return apply_reduction(loss, self.reduction)
        zero = loss.new_zeros(())
        id_part = apply_reduction(torch.where(known, loss, zero), "mean", known=known)
        ood_part = apply_reduction(torch.where(known, zero, loss), "mean", known=~known)
        return id_part + ood_part
