"""Maximum logit (MaxLogit) score.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song: "Scaling Out-of-Distribution Detection
for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ood_core.api import Detector


class MaxLogit(Detector):
    r"""Outlier score = negative maximum logit:

    .. math:: -\max_y f_y(x)

    Unlike the softmax probability, the raw logit keeps the magnitude of the evidence, which helps with many
    classes. Works on ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``).
    Needs no fitting.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    """

    input_kind = "logits"
    supports_segmentation = True

    def __init__(self, model: Any = None) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Negative maximum along the class axis (dim 1)."""
        return -logits.amax(dim=1)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(logits)
