"""NCI: the Neural-Collapse-inspired OOD detector.

Liu, Qin: "Detecting Out-of-Distribution Through the Lens of Neural Collapse", CVPR 2025 (arXiv:2311.01479).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ood_core.api import TensorSpec
from ood_core.detector.head_features import LinearHeadMeanDetector


class NCI(LinearHeadMeanDetector):
    r"""Outlier score = minus the proximity of the centred features to the weight vector of the predicted
    class, minus a feature-norm term:

    .. math:: s(h) = -\frac{(h - \mu_G)^\top w_{\hat y}}{\lVert h - \mu_G \rVert_2} - \alpha \lVert h \rVert_1,
        \qquad \hat y = \arg\max_c \, (W h + b)_c

    with :math:`\mu_G` the global mean of the ID fit features (Liu & Qin 2025: ID features, centred, cluster
    near the weight vector of their class, and lie farther from the origin than OOD features; the norm term is
    their filter). The first term is pytorch-ood's ``pScore`` (the cosine similarity times
    :math:`\lVert w_{\hat y}\rVert`, a per-class constant); the norm term is used only when :math:`\alpha > 0`.
    ``W`` and ``b`` are copied from ``head`` when the detector is built (pytorch-ood keeps a deep copy of the
    head) and saved with the state. The fit streams a float64 sum; samples labelled < 0 are left out of
    :math:`\mu_G` (pytorch-ood takes every sample given), ``fit_features(z)`` without labels takes all.
    A feature equal to :math:`\mu_G` gets proximity 0.

    :param encoder: network mapping inputs to ``B x D`` features (may be ``None`` for the ``*_features`` methods)
    :param head: the linear classification head (an ``nn.Linear``, possibly in a parameter-free wrapper)
    :param alpha: weight of the L1 feature-norm term (ignored when <= 0)
    """

    state_spec = {
        "w": TensorSpec(("C", "D")),
        "b": TensorSpec(("C",)),
        "global_mean": TensorSpec(("D",)),
    }
    mean_name = "global_mean"
    global_mean: Tensor
    #: pytorch-ood's search space for ``alpha`` (tuned on held-out ID + OOD data)
    hyperparameter_space: ClassVar[dict[str, list[float]]] = {"alpha": [0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0]}

    def __init__(self, encoder: Callable[[Tensor], Tensor] | None, head: Any, alpha: float = 0.0) -> None:
        super().__init__(encoder, head)
        self.alpha = float(alpha)
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    # ------------------------------------------------------------------ scores
    def proximity(self, h: Tensor) -> Tensor:
        r"""pScore :math:`(h - \mu_G)^\top w_{\hat y} / \lVert h - \mu_G \rVert_2` of ``B x D`` features."""
        centred = h - self.global_mean
        predicted = torch.addmm(self.b, h, self.w.T).argmax(dim=1)
        return (centred * self.w[predicted]).sum(dim=1) / centred.norm(dim=1).clamp_min(1e-12)

    def predict_features(self, h: Tensor) -> Tensor:
        """:param h: ``B x D`` features; returns ``B`` scores (float32)"""
        self._check_fitted()
        h = self.features(h)
        score = -self.proximity(h)
        if self.alpha > 0:
            score = score - self.alpha * h.abs().sum(dim=1)
        return score
