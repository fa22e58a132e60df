"""Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018), One-Class objective."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction, fill_masked, flatten_dense
from ood_core.loss.centers import ClassCenters


class DeepSVDDLoss(nn.Module):
    """Pulls ID embeddings into a hypersphere with center :math:`\\mu` and radius :math:`r`:

    .. math:: \\mathcal{L}(x) = \\max \\lbrace 0, \\lVert f(x) - \\mu \\rVert_2^2 - r^2 \\rbrace

    The radius is fixed (One-Class Deep SVDD; usually 0) and so is the center (a buffer). The paper
    initializes :math:`\\mu` with the mean of :math:`f(x)` over the training data: pass it as ``center``;
    otherwise it is drawn from :math:`\\mathcal{N}(0, I)`. OOD samples (labels ``< 0``) are ignored: zero loss,
    not counted by ``mean``. Embeddings may be ``B x D`` or dense ``B x D x H x W`` (per-pixel loss, targets
    ``B x H x W``).

    :param n_dim: dimensionality :math:`n` of the output space
    :param reduction: ``mean``, ``sum`` or ``none``
    :param radius: radius :math:`r`
    :param center: center :math:`\\mu \\in \\mathbb{R}^n`
    """

    radius: Tensor

    def __init__(
        self, n_dim: int, reduction: str | None = "mean", radius: float = 0.0, center: Tensor | None = None
    ) -> None:
        super().__init__()
        self._center = ClassCenters(1, n_dim, fixed=True)
        if center is not None:
            if center.shape != (n_dim,):
                raise ValueError(f"center must have shape ({n_dim},), got {tuple(center.shape)}")
            self._center.params.copy_(center.detach().reshape(1, n_dim))
        self.register_buffer("radius", torch.tensor(float(radius)))
        self.reduction = check_reduction(reduction)

    @property
    def center(self) -> ClassCenters:
        """The center :math:`\\mu` (a one-center :class:`ClassCenters`)."""
        return self._center

    def distance(self, x: Tensor) -> Tensor:
        """:math:`\\lVert x - \\mu \\rVert^2 - r^2` per sample (``B``) or per pixel (``B x H x W``); usable as
        outlier score."""
        return self.svdd_distance(x, self._center, self.radius)

    @staticmethod
    def svdd_distance(x: Tensor, center: ClassCenters, radius: Tensor | float = 0.0) -> Tensor:
        """:math:`\\lVert x - \\mu \\rVert^2 - r^2` in the shape of ``x`` without axis 1."""
        out_shape = (x.shape[0], *x.shape[2:])
        return (center(flatten_dense(x)).squeeze(1) - torch.as_tensor(radius).pow(2)).reshape(out_shape)

    @staticmethod
    def svdd_loss(x: Tensor, center: ClassCenters, radius: Tensor | float = 0.0, y: Tensor | None = None) -> Tensor:
        """Per-sample loss; OOD samples (``y < 0``) get ``0``. Without labels, all samples are ID."""
        values = DeepSVDDLoss.svdd_distance(x, center, radius).relu()
        if y is None:
            return values
        if y.shape != values.shape:
            raise ValueError(f"labels of shape {tuple(y.shape)} do not match embeddings {tuple(x.shape)}")
        return fill_masked(values[y >= 0], y >= 0)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """:param x: features; :param y: labels (ID or OOD); if not given, all samples are ID"""
        loss = self.svdd_loss(x, self._center, self.radius, y)
        return apply_reduction(loss, self.reduction, known=None if y is None else y >= 0)
