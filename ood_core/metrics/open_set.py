"""Open-set recognition metrics: the Open-Set Classification Rate (:func:`oscr_score`; Dhamija, Günther, Boult,
"Reducing Network Agnostophobia", NeurIPS 2018: area under :math:`\\mathrm{CCR}(\\tau)` against
:math:`\\mathrm{FPR}(\\tau)`, a sample being accepted when :math:`s \\leq \\tau`) and the openness of a problem
(:func:`calc_openness`; Scheirer et al., TPAMI 2013). Re-exported by :mod:`ood_core.metrics.functional`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ood_core.metrics.inputs import check_nan, flatten_pair

__all__ = ["calc_openness", "oscr_score"]


def oscr_score(outlier_scores: Tensor, predictions: Tensor, labels: Tensor) -> float:
    """Open-Set Classification Rate: the area under the curve of

    .. math::
        \\mathrm{CCR}(\\tau) = \\frac{|\\{x \\in \\mathcal{D}_K : \\hat y(x) = y(x),\\ s(x) \\leq \\tau\\}|}{|\\mathcal{D}_K|}
        \\quad \\text{against} \\quad
        \\mathrm{FPR}(\\tau) = \\frac{|\\{x \\in \\mathcal{D}_U : s(x) \\leq \\tau\\}|}{|\\mathcal{D}_U|}

    over all thresholds :math:`\\tau` (every distinct score), from :math:`(0, 0)` by the trapezoidal rule, with known
    samples :math:`\\mathcal{D}_K` (labels ``>= 0``) and unknown :math:`\\mathcal{D}_U` (labels ``< 0``). Dhamija et
    al. threshold the classifier's confidence; an outlier score is its negation. Tied known and unknown scores make
    a diagonal segment (as in the ROC), so the OSCR equals the closed-set accuracy times the AUROC of the correctly
    classified known samples against the unknown ones: at most the accuracy, about half of it for a random score.

    :param outlier_scores: :math:`s(x)`, any shape; :param predictions: predicted classes, same shape;
    :param labels: labels, same shape
    :raises ValueError: on mismatched shapes, NaN scores, or data without known or without unknown samples
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"inputs must have the same shape, got {tuple(predictions.shape)} and {tuple(labels.shape)}")
    scores, labels = flatten_pair(outlier_scores, labels)
    predictions = predictions.detach().reshape(-1).to(scores.device)
    check_nan(scores)
    known = labels >= 0
    n_known, n_unknown = int(known.sum()), int((~known).sum())
    if n_known == 0 or n_unknown == 0:
        raise ValueError("oscr_score requires both known (label >= 0) and unknown (label < 0) samples")
    values, inverse = torch.unique(scores.double(), return_inverse=True)  # ascending thresholds
    correct = torch.bincount(inverse.masked_select(known & (predictions == labels)), minlength=values.numel())
    accepted_unknown = torch.bincount(inverse.masked_select(~known), minlength=values.numel())
    zero = correct.new_zeros(1)
    ccr = torch.cat([zero, correct.cumsum(0)]).double() / n_known
    fpr = torch.cat([zero, accepted_unknown.cumsum(0)]).double() / n_unknown
    return float(torch.trapezoid(ccr, fpr))


def calc_openness(n_train: int, n_test: int, n_target: int) -> float:
    """Openness of an open-set problem, :math:`1 - \\sqrt{2 n_{train} / (n_{test} + n_{target})}` (Scheirer et al.,
    "Toward Open Set Recognition", TPAMI 2013): 0 when every test class was seen in training.

    :raises ValueError: if ``n_test + n_target`` is not positive
    """
    if n_test + n_target <= 0:
        raise ValueError("n_test + n_target must be positive")
    return 1.0 - math.sqrt(2 * n_train / (n_test + n_target))
