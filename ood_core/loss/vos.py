"""VOS energy regularization (Du, Wang, Cai, Li, "VOS: Learning What You Don't Know by Virtual Outlier
Synthesis", ICLR 2022), with real outliers (labels ``< 0``) instead of synthesized ones."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_dense_pair, check_reduction, flatten_dense
from ood_core.loss.crossentropy import per_entry_cross_entropy


def weighted_energy(logits: Tensor, weights_energy: nn.Linear) -> Tensor:
    """:math:`E(x) = -\\log \\sum_k \\mathrm{ReLU}(w_k) e^{f_k(x)}` for ``N x C`` logits, computed stably
    (the sum is clipped at the smallest positive float so all-zero weights give a large, finite energy)."""
    weights = F.relu(weights_energy.weight.reshape(1, -1))
    peak = logits.max(dim=1, keepdim=True).values
    total = (weights * torch.exp(logits - peak)).sum(dim=1).clamp_min(torch.finfo(logits.dtype).tiny)
    return -(peak.squeeze(1) + total.log())


def uncertainty_loss(phi: Callable[[Tensor], Tensor], energy: Tensor, is_outlier: Tensor) -> Tensor:
    """Per-sample logistic loss of :math:`\\phi(E)` separating outliers from ID samples.

    One output of :math:`\\phi`: the paper's form, :math:`-\\log \\sigma(\\phi(E(v)))` for an outlier
    :math:`v` and :math:`-\\log(1 - \\sigma(\\phi(E(x))))` for an ID sample :math:`x`. Two outputs (e.g.
    ``Linear(1, 2)`` as in the seed): cross-entropy with class ``1`` = ID and ``0`` = outlier, as in the
    authors' code.
    """
    out = phi(energy.unsqueeze(1))
    if out.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(out.squeeze(1), is_outlier.to(out.dtype), reduction="none")
    if out.shape[-1] == 2:
        return F.cross_entropy(out, (~is_outlier).long(), reduction="none")
    raise ValueError(f"logistic_regression must map N x 1 energies to N x 1 or N x 2, got {tuple(out.shape)}")


class VOSRegLoss(nn.Module):
    """Cross-entropy on ID data plus the VOS uncertainty regularizer:

    .. math::
        \\mathcal{L}_{unc} = \\mathbb{E}_{v \\sim V} \\left[ -\\log \\frac{1}{1 + e^{-\\phi(E(v))}} \\right]
        + \\mathbb{E}_{x \\sim D} \\left[ -\\log \\frac{e^{-\\phi(E(x))}}{1 + e^{-\\phi(E(x))}} \\right]

    with the weighted energy :math:`E(x) = -\\log \\sum_k \\mathrm{ReLU}(w_k) e^{f_k(x)}` (``weights_energy``)
    and :math:`V` the outliers of the batch (labels ``< 0``). Per entry: ID gets cross-entropy
    :math:`+ \\alpha` times its logistic term, OOD gets :math:`\\alpha` times its logistic term; ``mean``
    averages over all entries (so it equals mean CE + :math:`\\alpha` mean regularizer, as in pytorch-ood).
    Supports segmentation (every pixel is a sample). ``phi`` and ``weights_energy`` are submodules, so
    ``criterion.parameters()`` must be optimized together with the model.

    Initialization as in the seed::

        phi = torch.nn.Linear(1, 2)
        weights = torch.nn.Linear(num_classes, 1)
        torch.nn.init.uniform_(weights.weight)
        criterion = VOSRegLoss(phi, weights)

    :param logistic_regression: :math:`\\phi`, mapping ``N x 1`` energies to ``N x 1`` or ``N x 2``
    :param weights_energy: layer whose ``1 x C`` weight gives :math:`w`
    :param alpha: weight :math:`\\alpha` of the regularizer
    :param device: kept for API compatibility; computations use the device of the inputs
    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(
        self,
        logistic_regression: nn.Module,
        weights_energy: nn.Linear,
        alpha: float = 0.1,
        device: str = "cpu",
        reduction: str | None = "mean",
    ) -> None:
        super().__init__()
        self.logistic_regression = logistic_regression
        self.weights_energy = weights_energy
        self.alpha = alpha
        self.device = device
        self.reduction = check_reduction(reduction)

    def energy(self, logits: Tensor) -> Tensor:
        """Weighted energy per sample (``B``) or per pixel (``B x H x W``)."""
        return weighted_energy(flatten_dense(logits), self.weights_energy).reshape(logits.shape[0], *logits.shape[2:])

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        """:param logits: logits; :param y: labels (``< 0`` = outlier)"""
        check_dense_pair(logits, y)
        nll = per_entry_cross_entropy(logits, y)
        energy = weighted_energy(flatten_dense(logits), self.weights_energy)
        regularization = uncertainty_loss(self.logistic_regression, energy, y.reshape(-1) < 0).reshape(y.shape)
        return apply_reduction(nll + self.alpha * regularization, self.reduction)
