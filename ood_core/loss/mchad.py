"""MCHAD (Kirchheim, Filax, Ortmeier, "Multi-Class Hypersphere Anomaly Detection", ICPR 2022)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.loss.center import target_distances
from ood_core.loss.centers import ClassCenters


class MCHADLoss(nn.Module):
    """Learnable class centers :math:`\\mu_k` and, for squared distances :math:`D_k = \\lVert f(x) - \\mu_k
    \\rVert_2^2` (as returned by :meth:`distance`), three terms:

    .. math::
        \\mathcal{L}_{\\Lambda}(x, y) = \\max \\lbrace 0, D_y - r^2 \\rbrace \\qquad
        \\mathcal{L}_{\\Delta}(x, y) = \\log \\Big(1 + \\sum_{i \\neq y} e^{D_y - D_i}\\Big) \\qquad
        \\mathcal{L}_{\\Theta}(x) = \\sum_i \\max \\lbrace 0, (r + m)^2 - D_i \\rbrace

    :math:`\\mathcal{L}_{\\Lambda}` and :math:`\\mathcal{L}_{\\Delta}` (= cross-entropy of :math:`-D`) are
    averaged over ID samples, :math:`\\mathcal{L}_{\\Theta}` over OOD samples (``y < 0``); the loss is
    :math:`\\lambda_{\\Lambda} \\mathcal{L}_{\\Lambda} + \\lambda_{\\Delta} \\mathcal{L}_{\\Delta} +
    \\lambda_{\\Theta} \\mathcal{L}_{\\Theta}`. Without OOD samples it is unsupervised. This follows the
    seed/paper formulas; pytorch-ood's code squares the given distances again and drops :math:`r` in
    :math:`\\mathcal{L}_{\\Theta}`.

    :param n_classes: number of classes :math:`C`
    :param n_dim: dimensionality :math:`D` of the output space
    :param radius: radius :math:`r` of the hyperspheres
    :param margin: margin :math:`m` around the hyperspheres
    :param weight_center: :math:`\\lambda_{\\Lambda}`
    :param weight_nll: :math:`\\lambda_{\\Delta}`
    :param weight_oe: :math:`\\lambda_{\\Theta}`
    """

    def __init__(
        self,
        n_classes: int,
        n_dim: int,
        radius: float = 0,
        margin: float = 0,
        weight_center: float = 1.0,
        weight_nll: float = 1.0,
        weight_oe: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.radius = float(radius)
        self.margin = float(margin)
        self.weight_center = weight_center
        self.weight_nll = weight_nll
        self.weight_oe = weight_oe
        self._centers = ClassCenters(n_classes, n_dim, fixed=False)

    @property
    def centers(self) -> ClassCenters:
        """The class centers :math:`\\mu_y` (learnable)."""
        return self._centers

    def distance(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` embeddings; :return: ``B x C`` squared distances to the centers"""
        return self._centers(z)

    calculate_distances = distance

    def forward(self, distmat: Tensor, y: Tensor) -> Tensor:
        """:param distmat: ``B x C`` squared distances; :param y: labels (``< 0`` = OOD); :return: scalar"""
        if distmat.dim() != 2 or distmat.shape[1] != self.n_classes:
            raise ValueError(f"expected B x {self.n_classes} distances, got {tuple(distmat.shape)}")
        known = y >= 0
        loss = distmat.sum() * 0.0
        if bool(known.any()):
            loss_center = (target_distances(distmat, y) - self.radius**2).relu().mean()
            loss_nll = F.cross_entropy(-distmat[known], y[known])
            loss = loss + self.weight_center * loss_center + self.weight_nll * loss_nll
        if bool((~known).any()):
            loss_out = ((self.radius + self.margin) ** 2 - distmat[~known]).relu().sum(dim=1).mean()
            loss = loss + self.weight_oe * loss_out
        return loss
