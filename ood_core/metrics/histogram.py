"""Exact streaming summary of scored samples: a histogram ``distinct score -> (#negatives, #positives)``.

Every curve metric (ROC, PR, FPR at TPR, OSCR) depends on the data only through these counts, so keeping
them instead of the raw scores bounds memory by the number of *distinct* scores while the metrics stay
exactly those of the raw data. Ties are one threshold by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def count_by_score(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct scores (ascending, float64) with the number of negative and of positive samples at each.

    :param scores: flat scores
    :param positive: flat boolean mask of the positive samples, same length
    """
    values, inverse = torch.unique(scores.to(torch.float64), return_inverse=True)
    n_all = torch.bincount(inverse, minlength=values.numel())
    n_pos = torch.bincount(inverse.masked_select(positive), minlength=values.numel())
    return values, n_all - n_pos, n_pos


class ScoreHistogram:
    """Counts of negative and positive samples per distinct score, merged batch by batch.

    :param device: where the counts are kept; ``None``: the device of the first batch
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget all samples."""
        dev = self.device or torch.device("cpu")
        self.values = torch.empty(0, dtype=torch.float64, device=dev)
        self.n_neg = torch.empty(0, dtype=torch.int64, device=dev)
        self.n_pos = torch.empty(0, dtype=torch.int64, device=dev)

    def __len__(self) -> int:
        return self.values.numel()

    def add(self, scores: Tensor, positive: Tensor) -> None:
        """Add flat ``scores`` with the boolean mask ``positive`` (same length)."""
        if scores.numel() == 0:
            return
        values, n_neg, n_pos = count_by_score(scores, positive)
        if self.values.numel() == 0:
            dev = self.device or values.device
            self.values, self.n_neg, self.n_pos = values.to(dev), n_neg.to(dev), n_pos.to(dev)
            return
        dev = self.values.device
        merged, inverse = torch.unique(torch.cat([self.values, values.to(dev)]), return_inverse=True)
        size = merged.numel()
        self.n_neg = torch.zeros(size, dtype=torch.int64, device=dev).index_add_(
            0, inverse, torch.cat([self.n_neg, n_neg.to(dev)])
        )
        self.n_pos = torch.zeros(size, dtype=torch.int64, device=dev).index_add_(
            0, inverse, torch.cat([self.n_pos, n_pos.to(dev)])
        )
        self.values = merged
