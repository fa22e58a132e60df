"""II-loss (Hassen, Chan, "Learning a Neural-network-based Representation for Open Set Recognition",
SDM 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss.centers import RunningCenters, squared_distances


class IILoss(nn.Module):
    """Intra-class spread minus inter-class separation:

    .. math::
        \\mathcal{L} = \\frac{1}{N} \\sum_{i=1}^N \\lVert z_i - \\mu_{y_i} \\rVert_2^2
        - \\alpha \\min_{j \\neq k} \\lVert \\mu_j - \\mu_k \\rVert_2^2

    over the ID samples of the batch (labels ``< 0`` are ignored), the minimum taken over pairs of classes
    present in the batch (the term is 0 with fewer than two). In training mode :math:`\\mu` are the batch's
    class means (differentiable, as in the paper) and the running centers (buffers, :attr:`centers`) are
    updated; in eval mode the running centers are used. :math:`\\alpha` weighs the separation term (the paper
    has :math:`\\alpha = 1`).

    :param n_classes: number of classes
    :param n_embedding: embedding dimensionality
    :param alpha: weight :math:`\\alpha` of the inter-class separation
    """

    def __init__(self, n_classes: int, n_embedding: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.num_classes = n_classes
        self.alpha = alpha
        self.running_centers = RunningCenters(n_classes, n_embedding)

    @property
    def centers(self) -> RunningCenters:
        """Running class center estimates."""
        return self.running_centers

    def distance(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` embeddings; :return: ``B x C`` squared distances to the running centers"""
        return self.running_centers(x)

    def predict(self, x: Tensor) -> Tensor:
        """Class membership probabilities, softmin of :meth:`distance`, ``B x C``."""
        return torch.softmax(-self.distance(x), dim=1)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        """:param x: ``B x D`` embeddings; :param target: labels; :return: scalar loss"""
        known = target >= 0
        x, target = x[known], target[known]
        if target.numel() == 0:
            return x.sum() * 0.0
        if self.training:
            mu, counts = self.running_centers.batch_means(x, target)
            self.running_centers.update(x, target)
        else:
            mu, counts = self.running_centers.centers, torch.bincount(target, minlength=self.num_classes)
        intra_spread = (x - mu[target]).pow(2).sum() / x.shape[0]
        present = mu[counts > 0]
        if present.shape[0] < 2:
            return intra_spread
        center_dists = squared_distances(present, present)
        off_diagonal = ~torch.eye(present.shape[0], dtype=torch.bool, device=present.device)
        return intra_spread - self.alpha * center_dists[off_diagonal].min()
