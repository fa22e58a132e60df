"""fDBD: fast decision-boundary distance.

Liu, Qin: "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (arXiv:2312.11536).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ood_core.api import InvalidStateError, TensorSpec
from ood_core.detector.head_features import LinearHeadMeanDetector


class fDBD(LinearHeadMeanDetector):  # noqa: N801  (pytorch-ood's class name)
    r"""Outlier score = minus the mean distance of the features to the decision boundaries of the predicted
    class, relative to their distance to the mean ID feature (Liu & Qin 2024, Eq. 7):

    .. math:: s(z) = -\frac{1}{C-1} \sum_{c \ne \hat y}
        \frac{|l_{\hat y}(z) - l_c(z)|}{\lVert w_{\hat y} - w_c \rVert_2 \, \lVert z - \mu \rVert_2},
        \qquad l = W z + b, \quad \hat y = \arg\max_c l_c(z)

    :math:`|l_{\hat y} - l_c| / \lVert w_{\hat y} - w_c\rVert` is the closed-form distance from :math:`z` to the
    boundary between classes :math:`\hat y` and :math:`c` of the linear head, :math:`\mu` the mean feature of
    the fit data. No hyperparameters. ``W`` and ``b`` are copied from ``head`` when the detector is built and
    saved with the state (so a later change of the head does not change the scores, as in pytorch-ood, which
    fixes the weight differences at fit time). The fit streams a float64 sum; samples labelled < 0 (OOD) are
    left out of :math:`\mu` (pytorch-ood uses every sample it is given, the same when all are ID), and
    ``fit_features(z)`` without labels takes every sample. ``||z - μ||`` is clamped at 1e-8.

    :param encoder: network mapping inputs to ``B x D`` features (may be ``None`` for the ``*_features`` methods)
    :param head: the linear classification head (an ``nn.Linear``, possibly in a parameter-free wrapper)
    """

    state_spec = {
        "w": TensorSpec(("C", "D")),
        "b": TensorSpec(("C",)),
        "train_mean": TensorSpec(("D",)),
    }
    mean_name = "train_mean"
    train_mean: Tensor

    def __init__(self, encoder: Callable[[Tensor], Tensor] | None, head: Any) -> None:
        super().__init__(encoder, head)
        if head is not None and self.w.shape[0] < 2:
            raise ValueError("fDBD needs a head with at least 2 classes")
        self._pair_cache: tuple[Tensor, int, Tensor] | None = None

    def pair_norms(self) -> Tensor:
        r"""``C x C`` float32 matrix :math:`\lVert w_p - w_c \rVert_2` (diagonal set to 1), computed in float64
        from the Gram matrix of ``W`` and cached (keyed on ``w`` itself and its in-place version counter)."""
        w, cache = self.w, self._pair_cache
        if cache is None or cache[0] is not w or cache[1] != w._version:
            w64 = w.to(torch.float64)
            gram = w64 @ w64.T
            sq = gram.diagonal()
            norms = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()
            norms.fill_diagonal_(1.0)
            cache = self._pair_cache = (w, w._version, norms.to(torch.float32))
        return cache[2]

    def check_state(self) -> None:
        """Finite tensors, at least 2 classes and no two classes with the same weight vector (their
        boundary would be undefined)."""
        super().check_state()
        if self.w.shape[0] < 2:
            raise InvalidStateError("fDBD tensor 'w' must hold at least 2 classes")
        norms = self.pair_norms()
        diagonal = torch.eye(norms.shape[0], dtype=torch.bool, device=norms.device)
        if float(norms.masked_fill(diagonal, float("inf")).min()) <= 0.0:
            raise InvalidStateError("fDBD tensor 'w' has two classes with the same weight vector")

    # ------------------------------------------------------------------ scores
    def predict_features(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` features; returns ``B`` scores (float32)"""
        self._check_fitted()
        z = self.features(z)
        logits = torch.addmm(self.b, z, self.w.T)
        top, predicted = logits.max(dim=1)
        boundary = ((top[:, None] - logits) / self.pair_norms()[predicted]).sum(dim=1)
        spread = (z - self.train_mean).norm(dim=1).clamp_min(1e-8)
        return -boundary / ((self.w.shape[0] - 1) * spread)
