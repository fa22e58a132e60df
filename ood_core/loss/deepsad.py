"""Deep SAD (Ruff et al., "Deep Semi-Supervised Anomaly Detection", ICLR 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction
from ood_core.loss.centers import ClassCenters
from ood_core.loss.svdd import DeepSVDDLoss


class DeepSADLoss(nn.Module):
    """Deep SVDD's hypersphere objective extended to labeled outliers: ID embeddings are pulled to the center
    :math:`\\mu`, labeled outliers are pushed away through the inverse of their squared distance (the paper's
    :math:`(\\lVert \\phi(\\tilde x) - \\mu \\rVert^2)^{\\tilde y}` with :math:`\\tilde y = -1`):

    .. math::
        \\mathcal{L}(x, y) = \\begin{cases} \\lVert f(x) - \\mu \\rVert_2^2 & y \\geq 0 \\\\
        \\eta \\, (\\lVert f(x) - \\mu \\rVert_2^2 + \\epsilon)^{-1} & y < 0 \\end{cases}

    ``reduction="mean"`` averages over all :math:`n + m` samples, as the paper's objective
    :math:`\\frac{1}{n+m}(\\sum_i \\lVert\\phi(x_i)-\\mu\\rVert^2 + \\eta \\sum_j \\ldots)` does. As in
    pytorch-ood, every sample with a target :math:`\\geq 0` counts as unlabeled normal data, so :math:`\\eta` weighs
    only the labeled outliers (the paper also weighs labeled normal samples with it). :math:`\\epsilon` keeps
    the loss of an outlier at the center finite (the reference implementation's ``eps``).

    The center is fixed (a buffer, saved with the module); the paper initializes it with the mean of
    :math:`f(x)` over the training data: pass it as ``center`` (otherwise :math:`\\mathcal{N}(0, I)`). Use a
    network without bias terms, which could map every input onto the center. :meth:`distance` is the
    outlier score. Embeddings may be ``B x D`` or dense ``B x D x H x W`` (targets ``B x H x W``).

    :param n_dim: dimensionality :math:`n` of the output space
    :param eta: weight :math:`\\eta > 0` of the labeled outliers
    :param eps: :math:`\\epsilon > 0` added to an outlier's squared distance before inverting it
    :param reduction: ``mean``, ``sum`` or ``none``
    :param center: center :math:`\\mu \\in \\mathbb{R}^n`
    :raises ValueError: on a center of the wrong shape, a non-positive ``eta`` or ``eps``, or an unknown reduction
    """

    def __init__(
        self,
        n_dim: int,
        eta: float = 1.0,
        eps: float = 1e-6,
        reduction: str | None = "mean",
        center: Tensor | None = None,
    ) -> None:
        super().__init__()
        if eta <= 0 or eps <= 0:
            raise ValueError(f"eta and eps must be positive, got eta={eta}, eps={eps}")
        self._center = ClassCenters(1, n_dim, fixed=True)
        if center is not None:
            if center.shape != (n_dim,):
                raise ValueError(f"center must have shape ({n_dim},), got {tuple(center.shape)}")
            self._center.params.copy_(center.detach().reshape(1, n_dim))
        self.eta = eta
        self.eps = eps
        self.reduction = check_reduction(reduction)

    @property
    def center(self) -> ClassCenters:
        """The center :math:`\\mu` (a one-center :class:`ClassCenters`)."""
        return self._center

    def distance(self, x: Tensor) -> Tensor:
        """:math:`\\lVert x - \\mu \\rVert^2` per sample (``B``) or per pixel (``B x H x W``); the outlier score."""
        return DeepSVDDLoss.svdd_distance(x, self._center)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """:param x: embeddings; :param y: labels, ``< 0`` for labeled outliers
        :raises ValueError: if the labels do not match the embeddings' shape"""
        d = self.distance(x)
        if y.shape != d.shape:
            raise ValueError(f"labels of shape {tuple(y.shape)} do not match embeddings {tuple(x.shape)}")
        loss = torch.where(y >= 0, d, self.eta / (d + self.eps))
        return apply_reduction(loss, self.reduction)
