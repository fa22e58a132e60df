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
    """Cross-entropy on ID inputs plus a squared-hinge energy regularizer:

    .. math::
        \\mathcal{L}(x, y) = \\begin{cases} -\\log \\sigma_y(f(x)) + \\alpha \\max(0, E(x) - m_{in})^2 &
        y \\geq 0 \\\\ \\alpha \\max(0, m_{out} - E(x))^2 & y < 0 \\end{cases}

    with :math:`E(x) = -\\log \\sum_i e^{f_i(x)}`. This is the paper's (and seed's) formula; pytorch-ood's
    code uses :math:`+\\log\\sum` and applies the OOD margin inside the logits. The paper uses
    :math:`m_{in} = -25, m_{out} = -7, \\alpha = 0.1` on CIFAR; the defaults here are the seed's.
    Supports segmentation; ``mean`` averages over all entries.

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
        regularization = torch.where(
            targets < 0, (self.margin_out - energy).relu().pow(2), (energy - self.margin_in).relu().pow(2)
        )
        return apply_reduction(nll + self.alpha * regularization, self.reduction)
