"""GMM: class-conditional Gaussian mixture likelihood of the features.

A classical baseline (one Gaussian per class, full covariances, weights = class frequencies); it extends the
shared-covariance Gaussians of Lee et al.: "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks", NeurIPS 2018, to per-class covariances and the mixture likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask
from ood_core.gaussian import pooled_features

#: most elements of one ``components x batch x D`` projection block while scoring (128 MiB in float64)
MAX_BLOCK_ELEMENTS = 1 << 24


class ClassMoments:
    r"""Streaming per-class counts, means and centred scatter matrices, float64, merged exactly.

    Each batch's class groups are reduced to their count :math:`n_b`, mean :math:`m_b` and centred scatter
    :math:`M_b = \sum (z - m_b)(z - m_b)^\top`, then combined with the running ones (Chan, Golub & LeVeque's
    pairwise update): :math:`n = n_a + n_b`, :math:`\delta = m_b - m_a`, :math:`m = m_a + \delta n_b / n`,
    :math:`M = M_a + M_b + \delta\delta^\top n_a n_b / n`. Centring each group at its own mean avoids the
    cancellation of raw second moments for features far from the origin; the same update merges two shards'
    statistics (:meth:`merge`). Memory ``O(K D^2)`` for ``K`` classes.
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None  # (K,) float64
        self.means: Tensor | None = None  # (K, D) float64
        self.scatter: Tensor | None = None  # (K, D, D) float64

    def _grow(self, classes: int, dim: int, device: torch.device) -> None:
        if self.counts is None or self.means is None or self.scatter is None:
            self.counts = torch.zeros(classes, dtype=torch.float64, device=device)
            self.means = torch.zeros(classes, dim, dtype=torch.float64, device=device)
            self.scatter = torch.zeros(classes, dim, dim, dtype=torch.float64, device=device)
            return
        if self.means.shape[1] != dim:
            raise ValueError(f"GMM: features have {dim} dimensions, earlier batches {self.means.shape[1]}")
        extra = classes - self.counts.shape[0]
        if extra > 0:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
            self.means = torch.cat([self.means, self.means.new_zeros(extra, dim)])
            self.scatter = torch.cat([self.scatter, self.scatter.new_zeros(extra, dim, dim)])

    def combine(self, c: int, n_b: float, mean_b: Tensor, scatter_b: Tensor) -> None:
        """Fold a group of class ``c`` (count, mean, centred scatter) into the running statistics."""
        assert self.counts is not None and self.means is not None and self.scatter is not None
        n_a = float(self.counts[c])
        n = n_a + n_b
        delta = mean_b - self.means[c]
        self.means[c] += delta * (n_b / n)
        self.scatter[c] += scatter_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.counts[c] = n

    def update(self, z: Tensor, y: Tensor) -> None:
        """Fold in ``N x D`` features with labels ``y``; labels < 0 (OOD) are ignored."""
        y = torch.as_tensor(y).reshape(-1).to(z.device)
        if z.dim() != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(f"GMM expects N x D features and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
        known = known_mask(y)
        z, y = z[known].to(torch.float64), y[known].long()
        if y.numel() == 0:
            return
        self._grow(int(y.max()) + 1, z.shape[1], z.device)
        for c in torch.unique(y).tolist():
            group = z[y == c]
            mean = group.mean(0)
            centred = group - mean
            self.combine(c, float(group.shape[0]), mean, centred.T @ centred)

    def merge(self, counts: Tensor, means: Tensor, scatter: Tensor) -> None:
        """Fold another stream's statistics in (same feature dimension; any number of classes)."""
        if counts.numel() == 0:
            return
        device = self.counts.device if self.counts is not None else counts.device
        self._grow(counts.shape[0], means.shape[1], device)
        for c in torch.nonzero(counts > 0).reshape(-1).tolist():
            self.combine(c, float(counts[c]), means[c].to(device, torch.float64), scatter[c].to(device, torch.float64))


class GMM(Detector):
    r"""Outlier score = negative log-likelihood of the features under a mixture of one Gaussian per class:

    .. math:: s(z) = -\log \sum_{k=1}^{K} \pi_k \, \mathcal N(z \mid \mu_k, \Sigma_k)

    with the class means :math:`\mu_k`, the class covariances
    :math:`\Sigma_k = \frac{1}{n_k} \sum_{y_i = k} (z_i - \mu_k)(z_i - \mu_k)^\top + \mathrm{reg} \cdot I` and the
    class frequencies :math:`\pi_k = n_k / N` of the ID fit data. Unlike :class:`~ood_core.detector.Mahalanobis`
    every class has its own covariance, and the score is the full mixture likelihood (a log-sum-exp) instead
    of the distance to the closest class. There is one component per label present in the fit data (labels
    < 0 are ignored).

    The fit streams exact per-class moments (:class:`ClassMoments`, float64, memory ``O(K D^2)``). The state is
    float64: ``mu`` (``K x D``), ``precision_factor`` (``K x D x D``: upper-triangular :math:`F_k` with positive
    diagonal, :math:`\Sigma_k^{-1} = F_k F_k^\top`, i.e. :math:`F_k = L_k^{-\top}` for the Cholesky factor
    :math:`L_k` of :math:`\Sigma_k`) and ``log_weights`` (:math:`\log \pi_k`). So
    :math:`(z-\mu_k)^\top \Sigma_k^{-1} (z-\mu_k) = \lVert (z - \mu_k) F_k \rVert^2` and
    :math:`\log\det\Sigma_k = -2 \sum_j \log (F_k)_{jj}`: scoring is one GEMM per component and loading needs
    no factorization. ``B x C x H x W`` feature maps are averaged over space.

    :param encoder: network mapping inputs to features (may be ``None`` for the ``*_features`` methods)
    :param reg: added to the diagonal of every covariance, so that it is invertible with fewer samples than
        dimensions; a covariance that is still not positive definite fails the fit with ``ValueError``
    """

    requires_fit = True
    input_kind = "features"
    external_modules = ("encoder",)
    state_spec = {
        "mu": TensorSpec(("K", "D"), torch.float64),
        "precision_factor": TensorSpec(("K", "D", "D"), torch.float64),
        "log_weights": TensorSpec(("K",), torch.float64),
    }

    def __init__(self, encoder: Callable[[Tensor], Tensor] | None, reg: float = 1e-6) -> None:
        super().__init__()
        self.encoder = encoder
        self.reg = float(reg)
        if not (math.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"reg must be finite and >= 0, got {reg!r}")
        self._shift_cache: tuple[Tensor, Tensor, Tensor, tuple[int, int, int], Tensor, Tensor] | None = None

    def hparams(self) -> dict[str, Any]:
        return {"reg": self.reg}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        return cls(modules.get("encoder"), **hparams)

    def _extract(self, x: Tensor) -> Tensor:
        return self._require("encoder")(x)

    @property
    def feature_dim(self) -> int | None:
        return int(self.mu.shape[1]) if self.mu.dim() == 2 and self.mu.numel() else None

    def check_state(self) -> None:
        """Finite tensors; every ``precision_factor`` upper-triangular with a positive diagonal; mixture
        weights that sum to 1."""
        super().check_state()
        factor = self.precision_factor
        if bool((factor.tril(-1) != 0).any()):
            raise InvalidStateError("GMM tensor 'precision_factor' must be upper-triangular")
        if bool((factor.diagonal(dim1=1, dim2=2) <= 0).any()):
            raise InvalidStateError("GMM tensor 'precision_factor' must have a positive diagonal")
        total = float(torch.logsumexp(self.log_weights, 0)) if self.log_weights.numel() else -math.inf
        if abs(total) > 1e-6:
            raise InvalidStateError(
                f"GMM tensor 'log_weights' must be log-probabilities summing to 1 (log-sum {total:.3g})"
            )

    # ------------------------------------------------------------------ fit (streamed per-class moments)
    def _begin_fit(self) -> None:
        self._moments = ClassMoments()

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        self._moments.update(pooled_features(z.detach()), y)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Per-class ``counts`` (``K``), ``means`` (``K x D``) and centred ``scatter`` (``K x D x D``), float64."""
        m = self._moments
        if m.counts is None or m.means is None or m.scatter is None:
            return {}
        return {"counts": m.counts, "means": m.means, "scatter": m.scatter}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        if set(stats) != {"counts", "means", "scatter"}:
            raise ValueError(f"GMM statistics must be 'counts', 'means' and 'scatter', got {sorted(stats)}")
        counts, means, scatter = stats["counts"], stats["means"], stats["scatter"]
        k = counts.shape[0] if counts.dim() == 1 else -1
        dim = means.shape[1] if means.dim() == 2 else -1
        if k < 0 or means.shape[0] != k or scatter.shape != (k, dim, dim) or bool((counts < 0).any()):
            raise ValueError(
                f"GMM statistics do not fit together: counts {tuple(counts.shape)}, means {tuple(means.shape)}, "
                f"scatter {tuple(scatter.shape)}"
            )
        self._moments.merge(counts, means, scatter)

    def _finish_fit(self) -> None:
        moments, self._moments = self._moments, ClassMoments()
        self._store(moments)

    def _store(self, moments: ClassMoments) -> None:
        counts, means, scatter = moments.counts, moments.means, moments.scatter
        if counts is None or means is None or scatter is None or not bool((counts > 0).any()):
            raise ValueError("GMM: no ID samples (label >= 0) to fit on")
        present = counts > 0
        counts, means, scatter = counts[present], means[present], scatter[present]
        eye = torch.eye(means.shape[1], dtype=torch.float64, device=means.device)
        cov = scatter / counts[:, None, None] + self.reg * eye
        lower, info = torch.linalg.cholesky_ex((cov + cov.transpose(1, 2)) / 2)
        bad = torch.nonzero(info).reshape(-1).tolist()
        if bad:
            labels = torch.nonzero(present).reshape(-1)[bad].tolist()
            raise ValueError(
                f"GMM: the covariance of classes {labels[:10]} is not positive definite; increase reg (now {self.reg})"
            )
        inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)  # L^-1
        self.mu = means
        self.precision_factor = inverse.transpose(1, 2).contiguous()  # L^-T: upper-triangular
        self.log_weights = torch.log(counts / counts.sum())

    # ------------------------------------------------------------------ scores
    def _shifts(self) -> tuple[Tensor, Tensor]:
        """``mu_k F_k`` (``K x D``) and the constant ``log pi_k - log det(Sigma_k) / 2 - D log(2 pi) / 2``
        (``K``), cached (keyed on the tensors themselves and their in-place version counters)."""
        mu, factor, weights, cache = self.mu, self.precision_factor, self.log_weights, self._shift_cache
        key = (mu._version, factor._version, weights._version)
        if cache is None or cache[0] is not mu or cache[1] is not factor or cache[2] is not weights or cache[3] != key:
            shift = torch.bmm(mu[:, None, :], factor)[:, 0]
            log_det = -2 * torch.log(factor.diagonal(dim1=1, dim2=2)).sum(1)
            const = weights - 0.5 * (log_det + mu.shape[1] * math.log(2 * math.pi))
            cache = self._shift_cache = (mu, factor, weights, key, shift, const)
        return cache[4], cache[5]

    def log_likelihood(self, z: Tensor) -> Tensor:
        r""":math:`\log \pi_k \mathcal N(z \mid \mu_k, \Sigma_k)` of ``B x D`` features: ``B x K`` (float64)."""
        shift, const = self._shifts()
        z = z.to(torch.float64)
        k, dim = shift.shape
        step = max(1, MAX_BLOCK_ELEMENTS // max(1, z.shape[0] * dim))
        parts = []
        for start in range(0, k, step):
            proj = torch.matmul(z[None], self.precision_factor[start : start + step])  # (k', B, D)
            maha = (proj - shift[start : start + step, None, :]).square().sum(2)
            parts.append(const[start : start + step, None] - 0.5 * maha)
        return torch.cat(parts).T

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features (or ``B x D x H x W`` maps, averaged); returns ``B`` scores"""
        self._check_fitted()
        z = pooled_features(self._to_device(x.detach()))
        if z.dim() != 2 or z.shape[1] != self.mu.shape[1]:
            raise ValueError(f"GMM expects B x {self.mu.shape[1]} features, got shape {tuple(x.shape)}")
        score = -torch.logsumexp(self.log_likelihood(z), dim=1)
        return score.to(x.dtype if x.is_floating_point() else torch.float32)
