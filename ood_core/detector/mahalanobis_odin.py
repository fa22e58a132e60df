"""Mahalanobis distance of ODIN-style perturbed inputs (the input preprocessing of the Mahalanobis paper).

Lee, Lee, Lee, Shin: "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018 (Sec. 2, "input pre-processing"); the perturbation follows Liang, Li, Srikant (ODIN),
ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Self

import torch
from torch import Tensor

from ood_core.detector.mahalanobis import Mahalanobis


class MahalanobisODIN(Mahalanobis):
    r"""Outlier score = squared Mahalanobis distance to the closest class centre of the features of the perturbed
    input:

    .. math:: s(x) = \min_k (f(\tilde x) - \mu_k)^\top \Sigma^{-1} (f(\tilde x) - \mu_k), \qquad
        \tilde x = x - \varepsilon\, \operatorname{sign}\left(\nabla_x\, (f(x) - \mu_{\hat k})^\top \Sigma^{-1}
        (f(x) - \mu_{\hat k})\right) / \sigma

    with :math:`\hat k` the closest centre of :math:`f(x)`, :math:`\sigma` = ``norm_std`` per input channel (the
    step is :math:`\varepsilon` in un-normalized units) and :math:`\mu_k`, :math:`\Sigma` fitted as in
    :class:`~ood_core.detector.Mahalanobis` (streaming, float64, mergeable across shards; labels < 0 ignored).
    pytorch-ood scores half the distance, which ranks the same. The step needs one forward and one backward
    pass per batch, so :meth:`predict` needs the network (``input_kind = "input"``: the service runs it in the
    batch worker); :meth:`predict_features` scores features without the perturbation (the plain Mahalanobis
    score). The gradient of the mean over the batch is taken, so each sample's step depends only on itself.

    :param encoder: network mapping inputs to ``B x D`` features (may be ``None`` for ``fit_features``)
    :param eps: step size :math:`\varepsilon` (0: no perturbation)
    :param norm_std: per-channel standard deviations of the input normalization
    """

    input_kind = "input"  # type: ignore[assignment]  # narrowed to "features" by ClassGaussianFit
    external_modules = ("model", "encoder")

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        eps: float = 0.002,
        norm_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(encoder, eps, norm_std)
        self.encoder = encoder

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        encoder = modules.get("encoder")
        return cls(encoder if encoder is not None else modules.get("model"), **hparams)

    def predict(self, x: Tensor) -> Tensor:
        """:param x: inputs; perturbed (one backward pass), then passed through ``encoder`` again"""
        self._check_fitted()
        encoder = self._require("encoder")
        x_tilde = self._preprocess(encoder, x) if self.eps > 0 else x
        with torch.no_grad():
            return self.predict_features(encoder(x_tilde))
