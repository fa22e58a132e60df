"""Cross-entropy that ignores OOD inputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_dense_pair, check_reduction, fill_masked, flatten_dense


def per_entry_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """:math:`-\\log \\sigma_y(f(x))` for ID entries and ``0`` for OOD entries, in the shape of ``target``.

    :param logits: ``B x C`` or ``B x C x H x W``
    :param target: ``B`` or ``B x H x W``; entries ``< 0`` are OOD
    """
    check_dense_pair(logits, target)
    flat_logits, flat_target = flatten_dense(logits), target.reshape(-1)
    known = flat_target >= 0
    values = F.cross_entropy(flat_logits[known], flat_target[known], reduction="none")
    return fill_masked(values, known).reshape(target.shape)


class CrossEntropyLoss(nn.Module):
    """Standard cross-entropy :math:`-\\log \\sigma_y(f(x))`, but ignores OOD inputs (targets ``< 0``).

    Supports classification (``B x C`` logits) and segmentation (``B x C x H x W`` logits, ``B x H x W``
    targets). ``reduction="mean"`` averages over the ID entries only (as ``F.cross_entropy`` with an
    ``ignore_index``); ``"none"`` keeps the shape of the targets with ``0`` for OOD entries.

    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(self, reduction: str | None = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """:param logits: logits; :param targets: labels (``< 0`` = OOD, ignored)"""
        loss = per_entry_cross_entropy(logits, targets)
        return apply_reduction(loss, self.reduction, known=targets >= 0)
