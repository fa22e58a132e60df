"""Relative Mahalanobis Distance (RMD).

Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan: "A Simple Fix to Mahalanobis Distance for Improving
Near-OOD Detection", ICML UDL workshop 2021 (arXiv:2106.09022).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.api import TensorSpec, model_or_encoder
from ood_core.detector.gaussian_fit import ClassGaussianFit
from ood_core.gaussian import (
    ClassGaussianStats,
    check_precision,
    min_mahalanobis,
    output_dtype,
    pooled_features,
    robust_precision,
)


class RMD(ClassGaussianFit):
    r"""Outlier score = class-conditional minus background Mahalanobis distance, minimised over classes:

    .. math:: s(x) = \min_k \big( d_k(f(x)) - d_0(f(x)) \big) = \min_k d_k(f(x)) - d_0(f(x))

    where :math:`d_k(z) = (z-\mu_k)^\top \Sigma^{-1} (z-\mu_k)` uses the class means and the shared
    within-class covariance (as :class:`~ood_core.detector.Mahalanobis`), and
    :math:`d_0(z) = (z-\mu_0)^\top \Sigma_0^{-1} (z-\mu_0)` a single "background" Gaussian fitted to all ID
    features (maximum likelihood: total scatter / N). Labels < 0 are ignored.

    Both Gaussians come from one streaming pass (:class:`~ood_core.gaussian.ClassGaussianStats` through
    :class:`~ood_core.detector.gaussian_fit.ClassGaussianFit`; total scatter = within + between-class
    scatter), in float64; the state is float64 and the precisions are pseudo-inverses. ``B x C x H x W``
    feature maps are averaged over space.

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param encoder: pytorch-ood 0.4's name for ``model`` (give one of them)
    """

    state_spec = {
        "mu": TensorSpec(("C", "D"), torch.float64),
        "precision": TensorSpec(("D", "D"), torch.float64),
        "background_mu": TensorSpec(("D",), torch.float64),
        "background_precision": TensorSpec(("D", "D"), torch.float64),
    }

    def __init__(self, model: Any = None, *, encoder: Any = None) -> None:
        super().__init__()
        self.model = model_or_encoder(model, encoder, "RMD")

    def check_state(self) -> None:
        """Finite tensors; both precisions symmetric positive semi-definite and not all zero."""
        super().check_state()
        for name in ("precision", "background_precision"):
            check_precision(type(self).__name__, name, getattr(self, name))

    def _store_gaussians(self, stats: ClassGaussianStats) -> None:
        _, means, within = stats.finish()
        background_mean, total = stats.total_covariance()
        self.mu, self.precision = means, robust_precision(within)
        self.background_mu, self.background_precision = background_mean, robust_precision(total)

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features (or ``B x D x H x W`` maps, averaged); returns ``B`` scores"""
        self._check_fitted()
        z = pooled_features(self._to_device(x.detach()))
        class_dist = min_mahalanobis(z, self.mu, self.precision)
        background_dist = min_mahalanobis(z, self.background_mu[None, :], self.background_precision)
        return (class_dist - background_dist).to(output_dtype(x))
