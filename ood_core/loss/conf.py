"""Learned confidence (DeVries, Taylor, "Learning Confidence for Out-of-Distribution Detection in Neural
Networks", arXiv:1802.04865)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss._utils import check_dense_pair, flatten_dense


class ConfidenceLoss(nn.Module):
    """The network predicts a confidence :math:`c \\in [0, 1]` besides the class probabilities :math:`p`,
    which are interpolated towards the one-hot target :math:`y` before the negative log-likelihood:

    .. math::
        \\mathcal{L} = -\\sum_{i=1}^{M} y_i \\log p'_i - \\alpha \\log c, \\qquad p'_i = c\\, p_i + (1 - c)\\, y_i

    averaged over the ID samples (or pixels); OOD entries (``y < 0``) are ignored. :math:`p'` and :math:`c`
    are clipped to :math:`[\\epsilon, 1]`. pytorch-ood sums the NLL over the batch but averages the confidence
    term; we average both per sample. Not included: the paper's "hints" (applying the interpolation to half
    of the batch only) and ODIN preprocessing.

    :param alpha: weight :math:`\\alpha` of the confidence term (the paper adapts it to a budget)
    :param eps: clipping value :math:`\\epsilon`
    """

    def __init__(self, alpha: float = 1.0, eps: float = 1e-24) -> None:
        super().__init__()
        self.alpha = alpha
        self.eps = eps

    def forward(self, logits: Tensor, confidence: Tensor, target: Tensor) -> Tensor:
        """:param logits: ``B x C`` (or ``B x C x H x W``) class logits; :param confidence: predicted
        confidence in ``[0, 1]``, ``B`` / ``B x 1`` (or ``B x H x W`` / ``B x 1 x H x W``);
        :param target: labels (not one-hot); :return: scalar"""
        check_dense_pair(logits, target)
        if confidence.numel() != target.numel():
            raise ValueError(f"confidence of shape {tuple(confidence.shape)} does not match targets")
        flat_target = target.reshape(-1)
        known = flat_target >= 0
        if not bool(known.any()):
            return logits.sum() * 0.0
        probs = torch.softmax(flatten_dense(logits)[known], dim=1)
        y = flat_target[known]
        c = confidence.reshape(-1)[known].clamp(self.eps, 1.0)
        p_target = probs.gather(1, y.unsqueeze(1)).squeeze(1)
        adjusted = (c * p_target + (1 - c)).clamp(self.eps, 1.0)
        return (-adjusted.log() - self.alpha * c.log()).mean()
