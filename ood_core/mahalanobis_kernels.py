"""Precision matrices and batched Mahalanobis distances for the Gaussian detectors.

Shared by :mod:`~ood_core.detector.mahalanobis`, :mod:`~ood_core.detector.rmd`,
:mod:`~ood_core.detector.multi_mahalanobis`, :mod:`~ood_core.detector.pnml` and :mod:`~ood_core.detector.gmm`:
:func:`robust_precision` (the pseudo-inverse of a covariance, Cholesky fast path), :func:`check_precision` (state
validation), :func:`min_mahalanobis` / :func:`nearest_centre` (distances computed in blocks that bound memory for
many classes), :func:`pooled_features` and :func:`output_dtype`. The streaming statistics that produce the
covariances live in :mod:`ood_core.gaussian`, which re-exports every name here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.errors import InvalidStateError

#: most elements of one ``batch x classes`` distance block (bounds memory for very many classes)
MAX_BLOCK_ELEMENTS = 1 << 24
#: largest condition number bound for which :func:`robust_precision` inverts through Cholesky
MAX_CHOLESKY_CONDITION = 1e8
#: relative tolerance of :func:`check_precision` for asymmetry and negative eigenvalues (rounding)
PRECISION_TOLERANCE = 1e-8


def robust_precision(cov: Tensor) -> Tensor:
    """Inverse of a covariance matrix, robust to (near-)singularity.

    Moore-Penrose pseudo-inverse of the symmetric matrix in float64: eigenvalues at or below
    ``D · eps · λ_max`` (``eps`` = float64 machine epsilon) are treated as zero, as in scikit-learn's
    ``pinvh`` behind ``EmpiricalCovariance.precision_`` used by Lee et al.'s code. Features with constant or
    linearly dependent dimensions (ReLU units that never fire) thus give a finite precision that ignores the
    degenerate directions instead of overflowing.

    Fast path: when the Cholesky factorization succeeds and the condition number bound
    ``‖Σ‖_F ‖Σ⁻¹‖_F`` (≥ κ₂) is at most ``MAX_CHOLESKY_CONDITION``, no eigenvalue is anywhere near the
    cut-off, so the pseudo-inverse is the inverse; it is then taken from the Cholesky factor (several times
    cheaper than an eigendecomposition; the two agree to about κ·eps ≤ 1e-8 relative). Otherwise the
    eigendecomposition is used. Raises ``ValueError`` for a non-finite covariance (non-finite features).
    """
    cov = cov.to(torch.float64)
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("the covariance contains NaN or Inf: the features are not finite")
    cov = (cov + cov.T) / 2
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        precision = torch.cholesky_inverse(factor)
        bound = torch.linalg.matrix_norm(cov) * torch.linalg.matrix_norm(precision)
        if bool(torch.isfinite(bound)) and float(bound) <= MAX_CHOLESKY_CONDITION:
            return (precision + precision.T) / 2
    values, vectors = torch.linalg.eigh(cov)
    cutoff = values.abs().max() * cov.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(cutoff), 0.0)
    precision = (vectors * inverse) @ vectors.T
    return (precision + precision.T) / 2


def check_precision(owner: str, name: str, precision: Tensor) -> None:
    """Refuse a (finite) precision matrix that :func:`robust_precision` cannot have produced.

    It must be symmetric (within ``PRECISION_TOLERANCE`` of its largest entry), not all zero (every distance
    would be 0) and positive semi-definite. Positive definite is the common case and costs one Cholesky
    factorization of the float64 matrix; when that fails, the eigenvalues decide: the pseudo-inverse of a
    singular covariance (features with constant or collinear dimensions) is singular yet valid, so
    eigenvalues down to ``-PRECISION_TOLERANCE`` times the largest one count as zero. Raises
    :class:`InvalidStateError` naming ``owner``'s tensor ``name`` and the problem.
    """
    p = precision.detach().to(torch.float64)
    scale = float(p.abs().max()) if p.numel() else 0.0
    if scale == 0.0:
        raise InvalidStateError(f"{owner} tensor '{name}' is all zero: not a precision matrix")
    if float((p - p.T).abs().max()) > PRECISION_TOLERANCE * scale:
        raise InvalidStateError(f"{owner} tensor '{name}' is not symmetric")
    if int(torch.linalg.cholesky_ex(p).info) == 0:
        return
    values = torch.linalg.eigvalsh((p + p.T) / 2)
    lowest, highest = float(values[0]), float(values[-1])
    if highest <= 0.0 or lowest < -PRECISION_TOLERANCE * highest:
        raise InvalidStateError(
            f"{owner} tensor '{name}' is not positive semi-definite (eigenvalues from {lowest:.3g} to {highest:.3g})"
        )


def pooled_features(z: Tensor) -> Tensor:
    """``B x D`` features as they are; ``B x C x H x W`` (or any ``B x C x ...``) maps averaged spatially."""
    return z.flatten(2).mean(2) if z.dim() > 2 else z


def min_mahalanobis(x: Tensor, mu: Tensor, precision: Tensor) -> Tensor:
    r"""Squared Mahalanobis distance to the closest centre, :math:`\min_k (x-\mu_k)^\top P (x-\mu_k)`.

    Expanded as :math:`\|x\|_P^2 - 2\,x P \mu_k^\top + \|\mu_k\|_P^2` so that all classes cost two matmuls,
    after shifting everything by the mean centre (distances are shift-invariant; this keeps the terms small
    and avoids cancellation). Classes are processed in blocks of at most ``MAX_BLOCK_ELEMENTS`` distances.
    Computed in the dtype of ``precision`` (float64 here); returns that dtype.
    """
    origin = mu.mean(0)
    xc, mc = x.to(precision.dtype) - origin, mu - origin
    xp = xc @ precision
    x_norm = (xp * xc).sum(1)
    best = torch.full_like(x_norm, float("inf"))
    block = max(1, MAX_BLOCK_ELEMENTS // max(1, x.shape[0]))
    for start in range(0, mc.shape[0], block):
        m = mc[start : start + block]
        m_norm = ((m @ precision) * m).sum(1)
        dist = x_norm[:, None] - 2.0 * (xp @ m.T) + m_norm[None, :]
        best = torch.minimum(best, dist.min(1).values)
    return best.clamp_min(0.0)


def nearest_centre(x: Tensor, mu: Tensor, precision: Tensor) -> Tensor:
    """Index of the closest centre under the Mahalanobis metric (same expansion, no gradient)."""
    with torch.no_grad():
        origin = mu.mean(0)
        xc, mc = x.detach().to(precision.dtype) - origin, mu - origin
        dist = -2.0 * (xc @ precision @ mc.T) + ((mc @ precision) * mc).sum(1)[None, :]
        return dist.argmin(1)


def output_dtype(x: Tensor) -> torch.dtype:
    """Scores come back in the input's floating dtype (float32 for integer inputs)."""
    return x.dtype if x.is_floating_point() else torch.float32
