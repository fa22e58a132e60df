"""Metrics of a classifier's confidence against its correctness: the calibration error with adaptive bins
(:func:`calibration_error`) and the area under the response-rate accuracy curve (:func:`aurra`), both as defined by
the code of Hendrycks et al., "Natural Adversarial Examples", CVPR 2021 (as in pytorch-ood). Re-exported by
:mod:`ood_core.metrics.functional`."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.metrics.inputs import check_nan, flatten_pair

__all__ = ["NORMS", "aurra", "calibration_error"]

NORMS = ("1", "2", "infty", "infinity", "max")
"""Accepted ``p`` of :func:`calibration_error`."""


def _confidence_and_correct(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    confidence, correct = flatten_pair(confidence, correct)
    check_nan(confidence, "confidence")
    if confidence.numel() == 0:
        raise ValueError("the metric is undefined without samples")
    return confidence.double(), correct.double()


def calibration_error(confidence: Tensor, correct: Tensor, p: str = "2", beta: int = 100) -> float:
    """Calibration error with adaptive bins (the definition of Hendrycks et al.'s code, as in pytorch-ood): the
    samples, sorted by confidence, are cut into consecutive bins of ``beta`` samples (the last bin also takes the
    remainder; fewer than ``beta`` samples make one bin). With the gap :math:`g_b = |\\overline{conf}_b -
    \\overline{acc}_b|` of bin :math:`b` holding :math:`n_b` of the :math:`n` samples, the error is
    :math:`\\sum_b \\frac{n_b}{n} g_b` for ``p="1"`` (the expected calibration error with equal-mass bins),
    :math:`\\sqrt{\\sum_b \\frac{n_b}{n} g_b^2}` for ``p="2"`` and :math:`\\max_b g_b` for ``p="infty"``. Every sample is in a
    bin (the reference code skips the last bin).

    :param confidence: predicted confidence per sample, any shape
    :param correct: 1 (or ``True``) where the prediction was right, else 0, same shape
    :param p: ``"1"``, ``"2"`` or ``"infty"`` (also ``"infinity"``, ``"max"``)
    :param beta: samples per bin, at least 1
    :raises ValueError: on an invalid ``p`` or ``beta``, mismatched shapes, no samples or NaN confidences
    """
    if p not in NORMS:
        raise ValueError(f"p must be '1', '2' or 'infty', got {p!r}")
    if beta < 1:
        raise ValueError(f"beta must be a positive number of samples, got {beta}")
    confidence, correct = _confidence_and_correct(confidence, correct)
    order = torch.argsort(confidence, stable=True)
    n = confidence.numel()
    n_bins = max(1, n // beta)
    bins = (torch.arange(n, device=confidence.device) // beta).clamp_max(n_bins - 1)
    sizes = torch.bincount(bins, minlength=n_bins).double()
    sums = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    gaps = (sums.index_add_(0, bins, confidence[order] - correct[order]) / sizes).abs()
    if p == "1":
        return float((sizes * gaps).sum() / n)
    if p == "2":
        return float(((sizes * gaps.square()).sum() / n).sqrt())
    return float(gaps.max())


def aurra(confidence: Tensor, correct: Tensor) -> float:
    """Area under the response-rate accuracy curve, in ``[0, 1]``, higher is better: the samples are answered in
    order of decreasing confidence and the accuracy of the first :math:`k` answers is averaged over
    :math:`k = 1 \\ldots n`. Samples of equal confidence are answered in random order and the expected accuracy is
    used (the reference code takes the order ``argsort`` happens to give), so ties never depend on input order.

    :param confidence: confidence per sample, any shape; :param correct: 1 (or ``True``) where right, same shape
    :raises ValueError: on mismatched shapes, no samples or NaN confidences
    """
    confidence, correct = _confidence_and_correct(confidence, correct)
    values, inverse, counts = torch.unique(-confidence, return_inverse=True, return_counts=True)  # most confident first
    group_correct = torch.zeros(values.numel(), dtype=torch.float64, device=confidence.device)
    group_correct.index_add_(0, inverse, correct)
    correct_before = group_correct.cumsum(0) - group_correct
    answered_before = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(values.numel(), device=confidence.device), counts)
    k = torch.arange(1, confidence.numel() + 1, dtype=torch.float64, device=confidence.device)
    expected_correct = correct_before[group] + (k - answered_before[group]) * group_correct[group] / counts[group]
    return float((expected_correct / k).mean())
