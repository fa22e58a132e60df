"""Predictive entropy of the softmax posterior as outlier score.

Hendrycks, Mazeika, Dietterich: "Deep Anomaly Detection with Outlier Exposure", ICLR 2019 (entropy score);
Shannon, "A Mathematical Theory of Communication", 1948.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.detector.logit_base import LogitDetector


class Entropy(LogitDetector):
    r"""Outlier score = Shannon entropy of the softmax of the logits:

    .. math:: H(x) = -\sum_{i=1}^{C} \sigma_i(f(x)) \log \sigma_i(f(x))

    A flat posterior (high entropy, at most :math:`\log C`) means more OOD. Computed from ``log_softmax`` so
    that saturated probabilities stay accurate; terms with :math:`\sigma_i = 0` (e.g. ``-inf`` logits) count
    as 0. Works on ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``).
    Needs no fitting.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    """

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Entropy of ``softmax(logits)`` along the class axis (dim 1)."""
        log_p = logits.log_softmax(dim=1)
        p = log_p.exp()
        return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
