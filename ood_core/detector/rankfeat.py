"""RankFeat: rank-1 feature removal.

Song, Sebe, Wang: "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS 2022
(arXiv:2209.08590; code: github.com/KingJamesSong/RankFeat).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ood_core.detector.ash import ActivationShapingDetector


class RankFeat(ActivationShapingDetector):
    r"""Subtract the dominant rank-1 component of each sample's feature map, then score the head's logits
    (energy by default):

    .. math:: X' = X - \sigma_1 u_1 v_1^\top, \qquad s(x) = \mathrm{detector}(\mathrm{head}(X'))

    where :math:`X \in \mathbb R^{C \times HW}` is the sample's ``C x H x W`` feature map as a matrix and
    :math:`\sigma_1, u_1, v_1` its largest singular value and singular vectors (Song et al. 2022, Eq. 2). The
    paper observes that the leading singular value of OOD feature maps is typically larger than that of ID
    ones, so removing the rank-1 component lowers the confidence of OOD samples more. :math:`\sigma_1 u_1 v_1^\top` is computed exactly from
    one economy SVD per sample (the paper also gives a power-iteration approximation) in float32 (float64 for
    float64 maps). No fitting. With a fully convolutional head, ``B x K x H x W`` logits give ``B x H x W``
    scores.

    :param backbone: first part of the network, outputs ``B x C x H x W`` feature maps
    :param head: rest of the network, maps the feature maps to logits
    :param detector: maps logits to scores: a callable or a name of
        :data:`ood_core.detector.scores.SCORE_FUNCTION_NAMES`; default ``EnergyBased.score``; only the
        registered ones can be saved
    """

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__(backbone, head, detector)

    def hparams(self) -> dict[str, Any]:
        return self._score_hparams()

    @staticmethod
    def remove_rank1(maps: Tensor) -> Tensor:
        r""":math:`X - \sigma_1 u_1 v_1^\top` of every sample's ``C x (H W)`` matrix; same shape as ``maps``."""
        if maps.dim() < 3:
            raise ValueError(f"RankFeat expects B x C x H x W feature maps, got shape {tuple(maps.shape)}")
        dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
        m = maps.reshape(maps.shape[0], maps.shape[1], -1).to(dtype)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        rank1 = (u[:, :, :1] * s[:, None, :1]) @ vh[:, :1, :]
        return (m - rank1).reshape(maps.shape).to(maps.dtype)

    def shape(self, activations: Tensor) -> Tensor:
        return RankFeat.remove_rank1(activations)
