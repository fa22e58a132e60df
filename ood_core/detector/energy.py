"""Energy-based OOD detection (EBO).

Liu, Wang, Owens, Li: "Energy-based Out-of-distribution Detection", NeurIPS 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.detector.logit_base import TemperatureLogitDetector


class EnergyBased(TemperatureLogitDetector):
    r"""Outlier score = free energy of the logits:

    .. math:: E(x) = -T \log \sum_i e^{f_i(x) / T}

    Higher energy (less total evidence) means more OOD. Works on ``B x C`` logits and, for segmentation,
    on ``B x C x H x W`` logits (scores ``B x H x W``). Needs no fitting.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    :param t: temperature :math:`T`
    """

    @staticmethod
    def score(logits: Tensor, t: float | None = 1.0) -> Tensor:
        """Energy along the class axis (dim 1): ``-t * logsumexp(logits / t)``."""
        t = 1.0 if t is None else t
        return -t * torch.logsumexp(logits / t, dim=1)
