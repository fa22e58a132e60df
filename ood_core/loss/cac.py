"""Class Anchor Clustering (Miller, Sünderhauf, Milford, Dayoub, "Class Anchor Clustering: a Loss for
Distance-based Open Set Recognition", WACV 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.loss.centers import ClassCenters


class CACLoss(nn.Module):
    """Fixed class anchors :math:`c_k = \\lambda e_k` (scaled one-hot vectors in the ``C``-dimensional logit
    space) and, for the distances :math:`d_k = \\lVert f(x) - c_k \\rVert_2`,

    .. math::
        \\mathcal{L}(x, y) = \\log \\Big(1 + \\sum_{j \\neq y} e^{d_y - d_j}\\Big) + \\alpha\\, d_y

    (tuplet term plus anchor term), averaged over the ID samples; OOD samples (``y < 0``) are ignored.
    The tuplet term equals the cross-entropy of :math:`-d` (the :math:`j = y` summand is :math:`e^0 = 1`),
    which is how it is computed, without clamping.

    Following the paper and the authors' code, :meth:`distance` returns *Euclidean* distances (the seed
    says squared); :meth:`forward` accepts whatever distance matrix it is given.

    :param n_classes: number of classes :math:`C`
    :param magnitude: anchor magnitude :math:`\\lambda`
    :param alpha: weight :math:`\\alpha` of the anchor term
    """

    def __init__(self, n_classes: int, magnitude: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.magnitude = magnitude
        self.alpha = alpha
        self._centers = ClassCenters(n_classes, n_classes, fixed=True)
        self._centers.params.copy_(torch.eye(n_classes) * magnitude)

    @property
    def centers(self) -> ClassCenters:
        """The class anchors :math:`c_k` (fixed)."""
        return self._centers

    def distance(self, x: Tensor) -> Tensor:
        """:param x: ``B x C`` logits; :return: ``B x C`` Euclidean distances to the anchors"""
        return self._centers(x).clamp_min(1e-12).sqrt()  # clamp: finite gradient at an anchor

    def forward(self, distances: Tensor, target: Tensor) -> Tensor:
        """:param distances: ``B x C`` distances to the anchors; :param target: labels (``< 0`` ignored)"""
        if distances.dim() != 2 or distances.shape[1] != self.n_classes:
            raise ValueError(f"expected B x {self.n_classes} distances, got {tuple(distances.shape)}")
        known = target >= 0
        if not bool(known.any()):
            return distances.sum() * 0.0
        d_known, y_known = distances[known], target[known]
        anchor = d_known.gather(1, y_known.unsqueeze(1)).squeeze(1)
        tuplet = F.cross_entropy(-d_known, y_known, reduction="none")
        return (tuplet + self.alpha * anchor).mean()

    @staticmethod
    def score(distance: Tensor) -> Tensor:
        """Rejection score of the paper, :math:`\\min_k \\gamma_k` with
        :math:`\\gamma = d \\circ (1 - \\mathrm{softmin}(d))` (higher = more OOD).

        pytorch-ood returns :math:`-\\max_k \\gamma_k`; we follow the paper (the predicted class is
        :math:`\\arg\\min_k \\gamma_k` and a large minimum means the input is far from every anchor).
        """
        gamma = distance * (1 - torch.softmax(-distance, dim=1))
        return gamma.min(dim=1).values
