"""Maximum softmax probability (MSP) baseline.

Hendrycks, Gimpel: "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
Networks", ICLR 2017.
"""

from __future__ import annotations

from torch import Tensor

from ood_core.detector.logit_base import TemperatureLogitDetector


class MaxSoftmax(TemperatureLogitDetector):
    r"""Outlier score = negative maximum softmax probability, optionally with a temperature:

    .. math:: -\max_y \sigma_y(f(x) / T)

    A confident prediction (large top probability) means ID, so a higher score means more OOD. Works on
    ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``). Needs no fitting.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    :param t: temperature :math:`T`
    """

    @staticmethod
    def score(logits: Tensor, t: float | None = 1.0) -> Tensor:
        """Negative top softmax probability along the class axis (dim 1): ``-max softmax(logits / t)``."""
        t = 1.0 if t is None else t
        return -(logits / t).softmax(dim=1).amax(dim=1)
