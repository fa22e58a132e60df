"""Maximum softmax probability (MSP) baseline.

Hendrycks, Gimpel: "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
Networks", ICLR 2017.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ood_core.api import Detector


class MaxSoftmax(Detector):
    r"""Outlier score = negative maximum softmax probability, optionally with a temperature:

    .. math:: -\max_y \sigma_y(f(x) / T)

    A confident prediction (large top probability) means ID, so a higher score means more OOD. Works on
    ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``). Needs no fitting.

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
        """Negative top softmax probability along the class axis (dim 1): ``-max softmax(logits / t)``."""
        t = 1.0 if t is None else t
        return -(logits / t).softmax(dim=1).amax(dim=1)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(logits, self.t)
