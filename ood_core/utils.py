"""pytorch-ood's ``pytorch_ood.utils`` import path for the metrics: ``from ood_core.utils import OODMetrics``.

Also small numeric helpers shared by the detectors' fits (:func:`add_gram`, :func:`symmetric_from_upper`).
"""

from __future__ import annotations

from torch import Tensor

from ood_core.metrics import OODMetrics, fpr_at_tpr, ood_metrics

__all__ = ["OODMetrics", "add_gram", "fpr_at_tpr", "ood_metrics", "symmetric_from_upper"]


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
