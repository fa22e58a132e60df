"""Generalized center loss (Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss.centers import ClassCenters


def target_distances(distmat: Tensor, target: Tensor) -> Tensor:
    """:math:`d(f(x_i), \\mu_{y_i})` for the ID rows of a ``B x C`` distance matrix (``N_ID`` values)."""
    known = target >= 0
    return distmat[known].gather(1, target[known].unsqueeze(1)).squeeze(1)


class CenterLoss(nn.Module):
    """Draws embeddings to their class center :math:`\\mu_y`, up to a radius :math:`r`:

    .. math:: \\mathcal{L}(x, y) = \\max \\lbrace d(f(x), \\mu_y) - r, 0 \\rbrace

    averaged over the ID samples (OOD samples, ``y < 0``, are ignored), where :math:`d` is the given
    distance matrix (:meth:`distance` gives squared Euclidean distances: with :math:`r = 0` this is the
    original center loss up to its factor 1/2). pytorch-ood divides by ``B * C`` instead of the number of
    ID samples; we use the per-sample mean.

    Centers are scaled one-hot vectors :math:`\\lambda e_y` when ``n_classes == n_dim``, otherwise
    :math:`\\lambda \\mathcal{N}(0, I)` draws.

    :param n_classes: number of classes :math:`C`
    :param n_dim: dimensionality :math:`D` of the center space
    :param magnitude: scale :math:`\\lambda` of the initial centers
    :param radius: radius :math:`r` below which distances are not penalized
    :param fixed: if ``True`` the centers are not learnable
    """

    def __init__(
        self, n_classes: int, n_dim: int, magnitude: float = 1.0, radius: float = 0.0, fixed: bool = False
    ) -> None:
        super().__init__()
        self.num_classes = n_classes
        self.n_dim = n_dim
        self.magnitude = magnitude
        self.radius = radius
        self._centers = ClassCenters(n_classes, n_dim, fixed=fixed)
        with torch.no_grad():
            init = torch.eye(n_classes) if n_classes == n_dim else self._centers.params
            self._centers.params.copy_(init * magnitude)

    @property
    def centers(self) -> ClassCenters:
        """The class centers :math:`\\mu`."""
        return self._centers

    def distance(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` embeddings; :return: ``B x C`` squared Euclidean distances to the centers"""
        return self._centers(z)

    calculate_distances = distance

    def forward(self, distmat: Tensor, target: Tensor) -> Tensor:
        """:param distmat: ``B x C`` distances; :param target: labels (``< 0`` ignored); :return: scalar"""
        if not bool((target >= 0).any()):
            return distmat.sum() * 0.0
        return (target_distances(distmat, target) - self.radius).relu().mean()
