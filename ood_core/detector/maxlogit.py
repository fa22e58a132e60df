"""Maximum logit (MaxLogit) score.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song: "Scaling Out-of-Distribution Detection
for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

from torch import Tensor

from ood_core.detector.logit_base import LogitDetector


class MaxLogit(LogitDetector):
    r"""Outlier score = negative maximum logit:

    .. math:: -\max_y f_y(x)

    Unlike the softmax probability, the raw logit keeps the magnitude of the evidence, which helps with many
    classes. Works on ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``).
    Needs no fitting.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    """

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Negative maximum along the class axis (dim 1)."""
        return -logits.amax(dim=1)
