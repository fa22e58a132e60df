"""pytorch-ood's ``pytorch_ood.utils`` import path for the metrics: ``from ood_core.utils import OODMetrics``.

Also small numeric helpers shared by the detectors' fits (:func:`add_gram`, :func:`symmetric_from_upper`) and
state checks (:func:`all_finite`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.metrics import OODMetrics, fpr_at_tpr, ood_metrics

__all__ = ["OODMetrics", "add_gram", "all_finite", "fpr_at_tpr", "ood_metrics", "symmetric_from_upper"]

#: elements checked at a time by :func:`all_finite` (bounds its temporary mask to 1 MiB)
FINITE_CHUNK = 1 << 20


def add_gram(acc: Tensor, rows: Tensor) -> None:
    r"""``acc += rowsᵀ rows``, the product formed in the dtype of ``rows`` (float32 or float64: one GEMM) and
    added to ``acc`` (normally a float64 accumulator).

    Callers may rely on the upper triangle of ``acc`` only (see :func:`symmetric_from_upper`). A BLAS
    ``ssyrk`` (scipy) computes just that triangle, with half the flops, but on a shared 2-core machine it was
    no faster overall: its OpenBLAS thread pool competes with torch's own (measured in
    ``docs/benchmark-detectors.md``), so the product stays in torch.
    """
    acc += (rows.T @ rows).to(acc.dtype)


def symmetric_from_upper(matrix: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``matrix``."""
    upper = matrix.triu()
    return upper + upper.triu(1).T


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite (always true for integer and bool tensors).

    Checked in chunks of ``FINITE_CHUNK`` elements, so that a large tensor (a KNN bank) needs no mask of its
    own size."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(FINITE_CHUNK))
