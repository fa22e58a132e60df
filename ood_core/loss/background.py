"""Background-class loss: OOD inputs are mapped to an extra class (Dhamija et al., NeurIPS 2018, baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_dense_pair, check_reduction


class BackgroundClassLoss(nn.Module):
    """Cross-entropy where every target ``< 0`` is remapped to the background class :math:`N`:

    .. math:: \\mathcal{L}(x, y) = -\\log \\sigma_{y'}(f(x)), \\quad y' = N \\text{ if } y < 0 \\text{ else } y

    The logits must have :math:`N + 1` channels (``B x (N+1)`` or ``B x (N+1) x H x W``). ``mean`` averages
    over all entries.

    :param n_classes: number of classes :math:`N` (not counting the background class)
    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(self, n_classes: int, reduction: str | None = "mean") -> None:
        super().__init__()
        self.n_classes = n_classes
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """:param logits: class logits with :math:`N + 1` channels; :param targets: labels (``< 0`` = OOD)"""
        check_dense_pair(logits, targets)
        if logits.shape[1] != self.n_classes + 1:
            raise ValueError(f"expected {self.n_classes + 1} logit channels, got {logits.shape[1]}")
        remapped = torch.where(targets < 0, torch.full_like(targets, self.n_classes), targets)
        loss = F.cross_entropy(logits, remapped, reduction="none")
        return apply_reduction(loss, self.reduction)
