"""pNML: the regret of the single-layer predictive normalized maximum likelihood.

Bibas, Feder, Hassner: "Single Layer Predictive Normalized Maximum Likelihood for Out-of-Distribution
Detection", NeurIPS 2021 (arXiv:2110.09246; code: github.com/kobybibas/pnml_ood_detection).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from ood_core.api import TensorSpec
from ood_core.detector.head_features import HeadFeaturesDetector, id_rows
from ood_core.gaussian import CHUNK_ROWS, check_precision, robust_precision
from ood_core.utils import add_gram, symmetric_from_upper


class PNML(HeadFeaturesDetector):
    r"""Outlier score = the normalized pNML regret of the last layer (Bibas et al. 2021, Eq. 16-17):

    .. math:: R(z) = \frac{1}{\log C} \log \sum_{i=1}^{C}
        \frac{p_i}{p_i + (1 - p_i)\, p_i^{\kappa(z)}}, \qquad
        \kappa(z) = \frac{z^\top P z}{1 + z^\top P z}, \quad P = (X^\top X)^{+}

    :math:`z` is the L2-normalized feature of the input, :math:`X` the ``N x D`` matrix of L2-normalized ID
    fit features (:math:`P = X^+ X^{+\top}`), :math:`p = \mathrm{softmax}(\mathrm{head}(z))` the head's
    probabilities **of the normalized feature**, clamped to ``[eps, 1 - eps]``. :math:`R \in [0, 1]`: 0 for a
    confident prediction in well-supported directions, larger when the sample lies where the training features
    give little support. The fit streams the Gram matrix :math:`X^\top X` (mergeable sums, memory ``O(D^2)``),
    normalized and multiplied in float64 whatever the features' dtype: rounding errors of a float32 product
    (about 1e-7 of the largest eigenvalue) would be inverted as if they were directions of the data, and
    would make the scores depend on how the data was batched. :math:`P` is its pseudo-inverse (:func:`~ood_core.gaussian.robust_precision`: eigenvalues up
    to ``D · eps · λ_max`` count as zero), kept in float64. Samples labelled < 0 are ignored.

    :param encoder: network mapping inputs to ``B x D`` features (may be ``None`` for the ``*_features`` methods)
    :param head: maps L2-normalized features to logits
    :param eps: clamp of the probabilities
    """

    requires_fit = True
    state_spec = {"projector": TensorSpec(("D", "D"), torch.float64)}

    def __init__(
        self, encoder: Callable[[Tensor], Tensor] | None, head: Callable[[Tensor], Tensor] | None, eps: float = 1e-12
    ) -> None:
        super().__init__(encoder, head)
        self.eps = float(eps)
        if not (math.isfinite(self.eps) and 0.0 <= self.eps < 0.5):
            raise ValueError(f"eps must be in [0, 0.5), got {eps!r}")

    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps}

    @property
    def feature_dim(self) -> int | None:
        return int(self.projector.shape[0]) if self.projector.numel() else None

    def check_state(self) -> None:
        """A finite, symmetric positive semi-definite ``projector`` that is not all zero."""
        super().check_state()
        check_precision("PNML", "projector", self.projector)

    # ------------------------------------------------------------------ fit (streamed Gram matrix)
    def _begin_fit(self) -> None:
        self._gram: Tensor | None = None
        self._count = 0

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        rows = id_rows(self.check_features("PNML", z.detach()), y)
        if self._gram is None:
            self._gram = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
        elif self._gram.shape[0] != rows.shape[1]:
            raise ValueError(f"PNML: batch has {rows.shape[1]} features, earlier batches {self._gram.shape[0]}")
        for chunk in rows.split(CHUNK_ROWS):  # float64 products: the matrix is pseudo-inverted
            add_gram(self._gram, functional.normalize(chunk.to(torch.float64), dim=1))
        self._count += int(rows.shape[0])

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``gram`` (``D x D``, float64; its upper triangle is :math:`X^\\top X`) and ``count`` so far."""
        if self._gram is None:
            return {}
        return {"gram": self._gram, "count": torch.tensor(float(self._count), dtype=torch.float64)}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        gram = stats.get("gram")
        if set(stats) != {"gram", "count"} or gram is None or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"PNML statistics must be a D x D 'gram' and a 'count', got {sorted(stats)}")
        if self._gram is None:
            self._gram = gram.to(self.device, torch.float64).clone()
        elif gram.shape != self._gram.shape:
            raise ValueError(f"PNML: statistics of {gram.shape[0]} features, this fit has {self._gram.shape[0]}")
        else:
            self._gram += gram.to(self._gram.device, torch.float64)
        self._count += int(float(stats["count"]))

    def _finish_fit(self) -> None:
        gram, self._gram = self._gram, None
        if gram is None or self._count == 0:
            raise ValueError("PNML: no ID samples (label >= 0) to fit on")
        self.projector = robust_precision(symmetric_from_upper(gram))
        self._count = 0

    # ------------------------------------------------------------------ scores
    def kappa(self, z: Tensor) -> Tensor:
        r""":math:`\kappa` of L2-normalized ``B x D`` features (float64)."""
        z64 = z.to(torch.float64)
        proj = ((z64 @ self.projector) * z64).sum(dim=1)
        return proj / (1.0 + proj)

    def predict_features(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` features; returns ``B`` regrets in [0, 1] (float32)"""
        self._check_fitted()
        z = functional.normalize(self.check_features("PNML", z.detach(), self.feature_dim).to(torch.float32), dim=1)
        logits = self.logits(z)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"PNML needs B x C logits with C >= 2 from the head, got shape {tuple(logits.shape)}")
        probs = torch.softmax(logits.to(torch.float32), dim=1).clamp(self.eps, 1.0 - self.eps)
        probs = self._to_device(probs).to(torch.float64)
        kappa = self.kappa(self._to_device(z))[:, None]
        regret = torch.log((probs / (probs + (1.0 - probs) * probs.pow(kappa))).sum(dim=1))
        return (regret / math.log(probs.shape[1])).to(torch.float32)
