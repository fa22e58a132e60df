"""Relative Mahalanobis Distance (RMD).

Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan: "A Simple Fix to Mahalanobis Distance for Improving
Near-OOD Detection", ICML UDL workshop 2021 (arXiv:2106.09022).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, TensorSpec
from ood_core.gaussian import (
    ClassGaussianStats,
    min_mahalanobis,
    output_dtype,
    pooled_features,
    robust_precision,
)


class RMD(Detector):
    r"""Outlier score = class-conditional minus background Mahalanobis distance, minimised over classes:

    .. math:: s(x) = \min_k \big( d_k(f(x)) - d_0(f(x)) \big) = \min_k d_k(f(x)) - d_0(f(x))

    where :math:`d_k(z) = (z-\mu_k)^\top \Sigma^{-1} (z-\mu_k)` uses the class means and the shared
    within-class covariance (as :class:`~ood_core.detector.Mahalanobis`), and
    :math:`d_0(z) = (z-\mu_0)^\top \Sigma_0^{-1} (z-\mu_0)` a single "background" Gaussian fitted to all ID
    features (maximum likelihood: total scatter / N). Labels < 0 are ignored.

    Both Gaussians come from one streaming pass (:class:`~ood_core.gaussian.ClassGaussianStats`;
    total scatter = within + between-class scatter), in float64; the state is float64 and the precisions are
    pseudo-inverses. ``B x C x H x W`` feature maps are averaged over space.

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    """

    state_spec = {
        "mu": TensorSpec(("C", "D"), torch.float64),
        "precision": TensorSpec(("D", "D"), torch.float64),
        "background_mu": TensorSpec(("D",), torch.float64),
        "background_precision": TensorSpec(("D", "D"), torch.float64),
    }
    requires_fit = True
    input_kind = "features"

    def __init__(self, model: Any = None) -> None:
        super().__init__()
        self.model = model

    @property
    def feature_dim(self) -> int | None:
        return int(self.mu.shape[1]) if self.is_fitted else None

    @property
    def num_classes(self) -> int | None:
        return int(self.mu.shape[0]) if self.is_fitted else None

    def _begin_fit(self) -> None:
        self._stats = ClassGaussianStats()

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        self._stats.update(pooled_features(z), y)

    def _finish_fit(self) -> None:
        _, means, within = self._stats.finish()
        background_mean, total = self._stats.total_covariance()
        self.mu, self.precision = means, robust_precision(within)
        self.background_mu, self.background_precision = background_mean, robust_precision(total)
        del self._stats

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features (or ``B x D x H x W`` maps, averaged); returns ``B`` scores"""
        self._check_fitted()
        z = pooled_features(self._to_device(x.detach()))
        class_dist = min_mahalanobis(z, self.mu, self.precision)
        background_dist = min_mahalanobis(z, self.background_mu[None, :], self.background_precision)
        return (class_dist - background_dist).to(output_dtype(x))
