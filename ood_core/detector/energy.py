"""Energy-based OOD detection (EBO).

Liu, Wang, Owens, Li: "Energy-based Out-of-distribution Detection", NeurIPS 2020.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector


class EnergyBased(Detector):
    r"""Outlier score = free energy of the logits:

    .. math:: E(x) = -T \log \sum_i e^{f_i(x) / T}

    Higher energy (less total evidence) means more OOD. Works on ``B x C`` logits and, for segmentation,
    on ``B x C x H x W`` logits (scores ``B x H x W``). Needs no fitting.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    :param t: temperature :math:`T`
    """

    input_kind = "logits"
    supports_segmentation = True

    def __init__(self, model: Any = None, t: float | None = 1.0) -> None:
        super().__init__()
        self.model = model
        self.t = 1.0 if t is None else float(t)
        if self.t <= 0:
            raise ValueError(f"temperature t must be positive, got {t}")

    def hparams(self) -> dict[str, Any]:
        return {"t": self.t}

    @staticmethod
    def score(logits: Tensor, t: float | None = 1.0) -> Tensor:
        """Energy along the class axis (dim 1): ``-t * logsumexp(logits / t)``."""
        t = 1.0 if t is None else t
        return -t * torch.logsumexp(logits / t, dim=1)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(logits, self.t)
