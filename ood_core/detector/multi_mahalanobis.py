"""Mahalanobis distance on several layers, combined with weights.

Lee, Lee, Lee, Shin: "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018 (feature ensemble, Sec. 2.2, without the logistic-regression weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, TensorSpec
from ood_core.detector.layer_chain import chained_outputs
from ood_core.gaussian import (
    ClassGaussianStats,
    check_precision,
    min_mahalanobis,
    pooled_features,
    robust_precision,
)


class MultiMahalanobis(Detector):
    r"""Outlier score = weighted sum over layers of the per-layer Mahalanobis score:

    .. math:: s(x) = \sum_i \alpha_i \min_k (f_i(x) - \mu_{ik})^\top \Sigma_i^{-1} (f_i(x) - \mu_{ik})

    where :math:`f_i(x)` is the output of the first :math:`i` layers (``model[0]`` up to ``model[i]``, each
    applied to the previous output), averaged over space for ``B x C x H x W`` maps, and :math:`\mu_{ik}`,
    :math:`\Sigma_i` are the class means and shared covariance of layer :math:`i` (each fitted as in
    :class:`~ood_core.detector.Mahalanobis`, streaming, float64, pseudo-inverse). ``alpha`` defaults to 1 for
    every layer. No input preprocessing (as in pytorch-ood). Labels < 0 are ignored.

    State layout (fixed, so that one ``state_spec`` serves any number of layers of any widths): the ``L``
    layers are stacked and zero-padded to the widest layer ``M``: ``mu`` is ``L x C x M``, ``precision``
    ``L x M x M`` and ``layer_dims`` (int64, ``L``) holds each layer's true width; ``alpha`` stays a
    hyperparameter (JSON). Padding is exact: padded feature entries are zero and so are the padded precision rows and
    columns. ``feature_dim`` is ``None`` (there is one width per layer).

    :param model: list of consecutive layers :math:`f_1, \dots, f_n`
    :param alpha: per-layer weights (default: all 1)
    """

    state_spec = {
        "mu": TensorSpec(("L", "C", "M"), torch.float64),
        "precision": TensorSpec(("L", "M", "M"), torch.float64),
        "layer_dims": TensorSpec(("L",), torch.int64),
    }
    requires_fit = True
    input_kind = "multi_features"

    def __init__(self, model: Sequence[Any] | None = None, alpha: Sequence[float] | None = None) -> None:
        super().__init__()
        self.model = None if model is None else list(model)
        self.alpha = None if alpha is None else [float(a) for a in alpha]
        if self.alpha is not None and not all(math.isfinite(a) for a in self.alpha):
            raise ValueError("alpha must hold finite weights")
        if self.model is not None and len(self.model) == 0:
            raise ValueError("model must be a non-empty list of layers")
        if self.model is not None and self.alpha is not None and len(self.alpha) != len(self.model):
            raise ValueError(f"alpha has {len(self.alpha)} weights for {len(self.model)} layers")

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    @classmethod
    def from_state(
        cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]
    ) -> MultiMahalanobis:
        detector = cls(**modules, **hparams)
        if "layer_dims" not in tensors:  # a fit checkpoint before the fit finished: nothing fitted to check
            return detector
        dims, mu, precision = tensors["layer_dims"], tensors["mu"], tensors["precision"]
        if bool((dims < 1).any()) or int(dims.max()) != mu.shape[2]:
            raise ValueError(f"layer_dims {dims.tolist()} must be >= 1 with maximum {mu.shape[2]}")
        if detector.alpha is not None and len(detector.alpha) != len(dims):
            raise ValueError(f"alpha has {len(detector.alpha)} weights for {len(dims)} layers")
        for i, width in enumerate(dims.tolist()):
            if mu[i, :, width:].any() or precision[i, width:].any() or precision[i, :, width:].any():
                raise ValueError(f"layer {i}: padding beyond its width {width} is not zero")
        return detector

    @property
    def num_classes(self) -> int | None:
        return int(self.mu.shape[1]) if self.is_fitted else None

    def check_state(self) -> None:
        """Finite tensors; each layer's precision block symmetric positive semi-definite and not all zero."""
        super().check_state()
        for i, width in enumerate(self.layer_dims.tolist()):
            check_precision(type(self).__name__, f"precision[{i}]", self.precision[i, :width, :width])

    @property
    def num_layers(self) -> int | None:
        return int(self.mu.shape[0]) if self.is_fitted else None

    def _extract(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        """Outputs of every layer, each fed to the next."""
        return chained_outputs(self._require("model"), x)  # type: ignore[arg-type]

    def _begin_fit(self) -> None:
        self._stats: list[ClassGaussianStats] = []

    def _fit_batch(self, z: Any, y: Tensor) -> None:
        if not isinstance(z, (list, tuple)) or not z:
            raise ValueError("MultiMahalanobis expects a non-empty list of per-layer features")
        if not self._stats:
            self._stats = [ClassGaussianStats() for _ in z]
        if len(z) != len(self._stats):
            raise ValueError(f"got {len(z)} layers, expected {len(self._stats)}")
        for stats, layer_z in zip(self._stats, z, strict=True):
            stats.update(pooled_features(layer_z), y)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Each layer's :meth:`ClassGaussianStats.to_tensors`, prefixed ``layer{i}.``."""
        return {f"layer{i}.{k}": t for i, stats in enumerate(self._stats) for k, t in stats.to_tensors().items()}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        """Merge per layer (the parallel formula of :meth:`ClassGaussianStats.merge`)."""
        if not stats:
            return
        layers: dict[int, dict[str, Tensor]] = {}
        for name, t in stats.items():
            prefix, _, key = name.partition(".")
            if not (prefix.startswith("layer") and prefix[5:].isdigit()):
                raise ValueError(f"MultiMahalanobis statistics must be named layer<i>.<name>, got {name!r}")
            layers.setdefault(int(prefix[5:]), {})[key] = t
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"MultiMahalanobis statistics have layers {sorted(layers)}, expected 0..L-1")
        if not self._stats:
            self._stats = [ClassGaussianStats() for _ in layers]
        if len(layers) != len(self._stats):
            raise ValueError(f"got statistics of {len(layers)} layers, expected {len(self._stats)}")
        for i, layer_stats in enumerate(self._stats):
            layer_stats.merge(layers[i], self.device)

    def _finish_fit(self) -> None:
        fitted = [stats.finish() for stats in self._stats]
        self._stats = []
        if self.alpha is not None and len(self.alpha) != len(fitted):
            raise ValueError(f"alpha has {len(self.alpha)} weights for {len(fitted)} layers")
        classes = {means.shape[0] for _, means, _ in fitted}
        if len(classes) != 1:
            raise ValueError(f"layers disagree on the number of classes: {sorted(classes)}")
        widths = [means.shape[1] for _, means, _ in fitted]
        m, c, device = max(widths), classes.pop(), fitted[0][1].device
        mu = torch.zeros(len(fitted), c, m, dtype=torch.float64, device=device)
        precision = torch.zeros(len(fitted), m, m, dtype=torch.float64, device=device)
        for i, (_, means, cov) in enumerate(fitted):
            mu[i, :, : widths[i]] = means
            precision[i, : widths[i], : widths[i]] = robust_precision(cov)
        self.mu, self.precision = mu, precision
        self.layer_dims = torch.tensor(widths, dtype=torch.int64, device=device)

    def predict_features(self, x: Any, device: str | torch.device | None = None) -> Tensor:
        """:param x: list of per-layer features (``B x D_i`` or ``B x C_i x H x W``); returns ``B`` scores
        :param device: as in pytorch-ood, moves the features there first (by default: the fitted state's device)"""
        self._check_fitted()
        if device is not None and isinstance(x, (list, tuple)):
            x = [z.to(device) for z in x]
        if not isinstance(x, (list, tuple)) or len(x) != self.mu.shape[0]:
            raise ValueError(f"expected a list of {self.mu.shape[0]} per-layer feature tensors")
        weights = self.alpha if self.alpha is not None else [1.0] * len(x)
        total = None
        for i, layer_z in enumerate(x):
            width = int(self.layer_dims[i])
            z = pooled_features(self._to_device(layer_z.detach()))
            if z.shape[1] != width:
                raise ValueError(f"layer {i} has {z.shape[1]} features, the fit had {width}")
            dist = min_mahalanobis(z, self.mu[i, :, :width], self.precision[i, :width, :width])
            total = weights[i] * dist if total is None else total + weights[i] * dist
        assert total is not None
        first = x[0]
        return total.to(first.dtype if first.is_floating_point() else torch.float32)
