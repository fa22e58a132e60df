"""Mahalanobis distance to class-conditional Gaussians with a shared covariance.

Lee, Lee, Lee, Shin: "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018.

The module also holds the streaming Gaussian statistics (:class:`ClassGaussianStats`) and the batched
distance kernels shared with :mod:`~ood_core.detector.rmd` and :mod:`~ood_core.detector.multi_mahalanobis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, TensorSpec, known_mask

#: most elements of one ``batch x classes`` distance block (bounds memory for very many classes)
MAX_BLOCK_ELEMENTS = 1 << 24
#: rows converted to float64 at a time while fitting (bounds the fit's working memory for a large batch)
CHUNK_ROWS = 4096


class ClassGaussianStats:
    """Streaming per-class counts, means and pooled within-class scatter, in float64.

    Batches are merged, in chunks of ``CHUNK_ROWS`` rows, with the pairwise update of Chan, Golub & LeVeque
    (1979): each chunk is centred on its own class means, and the shift between old and chunk means is added
    as a rank-``C`` correction.
    Peak memory is ``O(C·D + D²)`` plus the batch and one float64 chunk of ``CHUNK_ROWS`` rows, whatever the
    number of batches, and the result does not suffer from the cancellation of the "sum of squares minus
    squared sum" formula.
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None  # (C,)
        self.means: Tensor | None = None  # (C, D)
        self.scatter: Tensor | None = None  # (D, D), sum over classes of sum (z - mu_c)(z - mu_c)^T

    def update(self, z: Tensor, y: Tensor) -> None:
        """Fold in features ``z`` (``N x D``) with labels ``y``; labels < 0 (OOD) are ignored."""
        y = y.reshape(-1).to(z.device)
        if z.dim() != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(f"expected N x D features and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
        keep = known_mask(y)
        z, y = (z.detach(), y.long()) if bool(keep.all()) else (z.detach()[keep], y[keep].long())
        if self.means is None:
            dim = z.shape[1]
            self.counts = torch.zeros(0, dtype=torch.float64, device=z.device)
            self.means = torch.zeros(0, dim, dtype=torch.float64, device=z.device)
            self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=z.device)
        assert self.counts is not None and self.scatter is not None
        if z.shape[1] != self.means.shape[1]:
            raise ValueError(f"feature dimension changed from {self.means.shape[1]} to {z.shape[1]}")
        if y.numel() == 0:
            return
        classes = max(int(y.max()) + 1, self.means.shape[0])
        if classes > self.means.shape[0]:  # new labels: grow with empty classes
            grow = classes - self.means.shape[0]
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
            self.means = torch.cat([self.means, self.means.new_zeros(grow, self.means.shape[1])])
        for rows, labels in zip(z.split(CHUNK_ROWS), y.split(CHUNK_ROWS), strict=True):
            self._merge(rows.to(torch.float64), labels)

    def _merge(self, z: Tensor, y: Tensor) -> None:
        """Chan et al.'s merge of one float64 chunk into the running statistics."""
        assert self.counts is not None and self.means is not None and self.scatter is not None
        chunk_counts = torch.bincount(y, minlength=self.means.shape[0]).to(torch.float64)
        chunk_sums = torch.zeros_like(self.means).index_put_((y,), z, accumulate=True)
        chunk_means = chunk_sums / chunk_counts.clamp_min(1.0)[:, None]
        centred = z - chunk_means[y]
        self.scatter += centred.T @ centred
        total = self.counts + chunk_counts
        shift = chunk_means - self.means
        weight = torch.where(total > 0, self.counts * chunk_counts / total.clamp_min(1.0), 0.0)
        self.scatter += (shift * weight[:, None]).T @ shift
        self.means += shift * torch.where(total > 0, chunk_counts / total.clamp_min(1.0), 0.0)[:, None]
        self.counts = total

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts, means, within-class covariance = scatter / N)``; every class ``0..C-1`` must occur."""
        if self.counts is None or self.means is None or self.scatter is None or self.counts.sum() == 0:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        missing = (self.counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"classes {missing[:10]} have no samples; labels must be 0..C-1 with all classes present")
        return self.counts, self.means, self.scatter / self.counts.sum()

    def total_covariance(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of all ID samples (one Gaussian): within plus between-class scatter, / N."""
        counts, means, within = self.finish()
        n = counts.sum()
        mean = (counts[:, None] * means).sum(0) / n
        dev = means - mean
        return mean, within + (dev * (counts / n)[:, None]).T @ dev


def robust_precision(cov: Tensor) -> Tensor:
    """Inverse of a covariance matrix, robust to (near-)singularity.

    Moore-Penrose pseudo-inverse of the symmetric matrix in float64, from its eigendecomposition:
    eigenvalues at or below ``D · eps · λ_max`` (``eps`` = float64 machine epsilon) are treated as zero, as
    in scikit-learn's ``pinvh`` behind ``EmpiricalCovariance.precision_`` used by Lee et al.'s code. Features
    with constant or linearly dependent dimensions (ReLU units that never fire) thus give a finite precision
    that ignores the degenerate directions instead of overflowing.
    """
    cov = cov.to(torch.float64)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    cutoff = values.abs().max() * cov.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(cutoff), 0.0)
    precision = (vectors * inverse) @ vectors.T
    return (precision + precision.T) / 2


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


class Mahalanobis(Detector):
    r"""Outlier score = squared Mahalanobis distance to the closest class centre:

    .. math:: s(x) = \min_k \, (f(x) - \mu_k)^\top \Sigma^{-1} (f(x) - \mu_k)

    with class means :math:`\mu_k` and the shared (pooled within-class, maximum-likelihood) covariance
    :math:`\Sigma = \frac1N \sum_k \sum_{y_i = k} (f(x_i)-\mu_k)(f(x_i)-\mu_k)^\top` (Lee et al. 2018). The
    paper's confidence is :math:`-s`. Labels < 0 are ignored; labels must be ``0..C-1`` with all present.

    :meth:`predict` applies the paper's input preprocessing when ``eps > 0``:
    :math:`\tilde x = x - \varepsilon\,\mathrm{sign}(\nabla_x s(x)) / \sigma` (a step that decreases the
    distance to the closest centre; :math:`\sigma` = ``norm_std`` per input channel, when given), then scores
    :math:`f(\tilde x)`. :meth:`predict_features` scores features as they are. ``B x C x H x W`` feature maps
    are averaged over space.

    The fit streams (:class:`ClassGaussianStats`, float64). The state (``mu``, ``precision``) is float64:
    the precision of an ill-conditioned covariance and the expanded distance lose digits in float32.
    The precision is the pseudo-inverse (:func:`robust_precision`).

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param eps: magnitude of the input preprocessing (0 disables it)
    :param norm_std: per-channel standard deviations of the input normalization
    """

    state_spec = {
        "mu": TensorSpec(("C", "D"), torch.float64),
        "precision": TensorSpec(("D", "D"), torch.float64),
    }
    requires_fit = True
    input_kind = "features"

    def __init__(self, model: Any = None, eps: float = 0.002, norm_std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.eps = float(eps)
        self.norm_std = None if norm_std is None else [float(s) for s in norm_std]
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")

    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm_std": self.norm_std}

    @property
    def feature_dim(self) -> int | None:
        return int(self.mu.shape[1]) if self.is_fitted else None

    @property
    def num_classes(self) -> int | None:
        return int(self.mu.shape[0]) if self.is_fitted else None

    @property
    def cov(self) -> Tensor:
        """Shared covariance (pseudo-inverse of the stored precision)."""
        self._check_fitted()
        return torch.linalg.pinv(self.precision, hermitian=True)

    # ------------------------------------------------------------------ fitting (streaming)
    def _begin_fit(self) -> None:
        self._stats = ClassGaussianStats()

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        self._stats.update(pooled_features(z), y)

    def _finish_fit(self) -> None:
        _, means, cov = self._stats.finish()
        self.mu, self.precision = means, robust_precision(cov)
        del self._stats

    # ------------------------------------------------------------------ prediction
    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features (or ``B x D x H x W`` maps, averaged); returns ``B`` scores"""
        self._check_fitted()
        z = pooled_features(self._to_device(x.detach()))
        return min_mahalanobis(z, self.mu, self.precision).to(output_dtype(x))

    def predict(self, x: Tensor) -> Tensor:
        """Scores inputs ``x``: preprocessing (if ``eps > 0``), then the network, then the distance."""
        self._check_fitted()
        model = self._require("model")
        if self.eps > 0:
            x = self._preprocess(model, x)
        with torch.no_grad():
            z = model(x)
        return self.predict_features(z)

    def _preprocess(self, model: Any, x: Tensor) -> Tensor:
        """One signed-gradient step on ``x`` that decreases the distance to the closest centre."""
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            z = pooled_features(model(x_in))
            mu, precision = self.mu.to(z.device), self.precision.to(z.device)
            centred = z.to(precision.dtype) - mu[nearest_centre(z, mu, precision)]
            loss = ((centred @ precision) * centred).sum(1).mean()
            (grad,) = torch.autograd.grad(loss, x_in)
        step = torch.sign(grad)
        if self.norm_std is not None:
            std = torch.tensor(self.norm_std, dtype=step.dtype, device=step.device)
            step = step / std.reshape(1, -1, *([1] * (step.dim() - 2)))
        return (x.detach() - self.eps * step).detach()
