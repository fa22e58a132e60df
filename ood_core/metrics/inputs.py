"""Input checks shared by the metric functions: two inputs of one shape flattened to samples, and NaN scores
refused."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_nan", "flatten_pair"]


def flatten_pair(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs flattened (every entry a sample; labels on the values' device); ``ValueError`` unless they have
    the same shape."""
    if values.shape != labels.shape:
        raise ValueError(f"inputs must have the same shape, got {tuple(values.shape)} and {tuple(labels.shape)}")
    return values.detach().reshape(-1), labels.detach().reshape(-1).to(values.device)


def check_nan(scores: Tensor, name: str = "scores") -> None:
    """``ValueError`` if floating-point ``scores`` hold a NaN."""
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contain NaN")
