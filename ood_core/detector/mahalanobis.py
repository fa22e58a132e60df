"""Mahalanobis distance to class-conditional Gaussians with a shared covariance.

Lee, Lee, Lee, Shin: "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018.

The streaming Gaussian statistics and distance kernels live in :mod:`ood_core.gaussian`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ood_core.api import TensorSpec, model_or_encoder
from ood_core.detector.gaussian_fit import ClassGaussianFit
from ood_core.gaussian import (
    ClassGaussianStats,
    check_precision,
    min_mahalanobis,
    nearest_centre,
    output_dtype,
    pooled_features,
    robust_precision,
)


class Mahalanobis(ClassGaussianFit):
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

    The fit streams (:class:`ClassGaussianStats`, float64, through :class:`ClassGaussianFit`). The state
    (``mu``, ``precision``) is float64: the precision of an ill-conditioned covariance and the expanded
    distance lose digits in float32. The precision is the pseudo-inverse (:func:`robust_precision`).

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param eps: magnitude of the input preprocessing (0 disables it)
    :param norm_std: per-channel standard deviations of the input normalization
    :param encoder: pytorch-ood 0.4's name for ``model`` (give one of them)
    """

    state_spec = {
        "mu": TensorSpec(("C", "D"), torch.float64),
        "precision": TensorSpec(("D", "D"), torch.float64),
    }

    def __init__(
        self,
        model: Any = None,
        eps: float = 0.002,
        norm_std: Sequence[float] | None = None,
        *,
        encoder: Any = None,
    ) -> None:
        super().__init__()
        self.model = model_or_encoder(model, encoder, "Mahalanobis")
        self.eps = float(eps)
        self.norm_std = None if norm_std is None else [float(s) for s in norm_std]
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        if self.norm_std is not None and not all(math.isfinite(s) and s > 0 for s in self.norm_std):
            raise ValueError("norm_std must hold finite standard deviations > 0")

    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm_std": self.norm_std}

    @property
    def cov(self) -> Tensor:
        """Shared covariance (pseudo-inverse of the stored precision)."""
        self._check_fitted()
        return torch.linalg.pinv(self.precision, hermitian=True)

    def check_state(self) -> None:
        """Finite ``mu`` and ``precision``; ``precision`` symmetric positive semi-definite and not all zero."""
        super().check_state()
        check_precision(type(self).__name__, "precision", self.precision)

    # ------------------------------------------------------------------ fitting (streaming, ClassGaussianFit)
    def _store_gaussians(self, stats: ClassGaussianStats) -> None:
        _, means, cov = stats.finish()
        self.mu, self.precision = means, robust_precision(cov)

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
