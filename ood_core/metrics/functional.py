"""Metrics computed in one go from all scores and labels, on the tensors' device (pytorch-ood's
``pytorch_ood.metrics.functional``).

Conventions: labels ``< 0`` mark OOD samples, the *positive* class of the OOD curves; larger outlier scores mean
more OOD. Inputs of any shape are flattened (every entry, e.g. every pixel, is a sample). Curves have one point
per distinct score, so tied scores are one threshold (as in scikit-learn); they are computed from the exact
counts of :mod:`ood_core.metrics.histogram` in float64.

- ROC: :math:`\\mathrm{TPR}(t) = |\\{s_i \\geq t, y_i < 0\\}| / N_{ood}`, :math:`\\mathrm{FPR}(t) = |\\{s_i \\geq t,
  y_i \\geq 0\\}| / N_{id}`; AUROC by the trapezoidal rule from :math:`(0, 0)` (Hendrycks & Gimpel, ICLR 2017).
- AUPR: average precision :math:`\\sum_k (R_k - R_{k-1}) P_k` over the thresholds, scikit-learn's
  ``average_precision_score`` and the same value as :class:`~ood_core.metrics.OODMetrics` (pytorch-ood 0.4.0
  integrates the PR curve with the trapezoidal rule instead, which is optimistic).
- AUTC (Humblot-Renaux, Escalera, Moeslund, "Beyond AUROC & co. for evaluating out-of-distribution detection
  performance", CVPR-W 2023): :math:`\\frac{1}{2} \\int_0^1 \\mathrm{FPR}(\\tau) + \\mathrm{FNR}(\\tau)\\, d\\tau` on
  min-max normalized scores :math:`s'`, which equals :math:`\\frac{1}{2}(\\overline{s'}_{id} + 1 - \\overline{s'}_{ood})`.

Also re-exported here (pytorch-ood's module holds them too): the open-set metrics of
:mod:`ood_core.metrics.open_set` (``oscr_score``, ``calc_openness``) and the confidence-calibration metrics of
:mod:`ood_core.metrics.calibration_metrics` (``calibration_error``, ``aurra``); input checks in
:mod:`ood_core.metrics.inputs`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.metrics.calibration_metrics import aurra, calibration_error
from ood_core.metrics.histogram import count_by_score
from ood_core.metrics.inputs import check_nan, flatten_pair
from ood_core.metrics.open_set import calc_openness, oscr_score

__all__ = [
    "accuracy",
    "aupr",
    "auroc",
    "aurra",
    "autc",
    "calc_openness",
    "calibration_error",
    "fpr_at_tpr",
    "oscr_score",
    "pr_curve",
    "roc_curve",
]

POSITIVES = ("ood", "id")


def _check_positive(positive: str) -> None:
    if positive not in POSITIVES:
        raise ValueError(f"positive must be 'ood' or 'id', got {positive!r}")


def descending_counts(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct scores in *descending* order with the number of OOD and of ID samples at each.

    :raises ValueError: on mismatched shapes, NaN scores, or data without ID or without OOD samples
    """
    scores, labels = flatten_pair(scores, labels)
    check_nan(scores)
    values, n_id, n_ood = count_by_score(scores, labels < 0)
    return check_both(values.flip(0), n_ood.flip(0), n_id.flip(0))


def check_both(values: Tensor, n_ood: Tensor, n_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pass the counts through, raising ``ValueError`` if there are no OOD or no ID samples."""
    if int(n_ood.sum()) == 0 or int(n_id.sum()) == 0:
        raise ValueError("Data must contain ID and OOD samples.")
    return values, n_ood, n_id


def roc_from_counts(n_pos: Tensor, n_neg: Tensor) -> tuple[Tensor, Tensor]:
    """FPR and TPR (float64) from per-threshold counts in descending score order, starting at ``(0, 0)``."""
    zero = n_pos.new_zeros(1)
    tps, fps = torch.cat([zero, n_pos.cumsum(0)]).double(), torch.cat([zero, n_neg.cumsum(0)]).double()
    return fps / fps[-1], tps / tps[-1]


def average_precision_from_counts(n_pos: Tensor, n_neg: Tensor) -> Tensor:
    """:math:`\\sum_k (R_k - R_{k-1}) P_k` over thresholds in the given order (most positive first)."""
    tps, fps = n_pos.cumsum(0).double(), n_neg.cumsum(0).double()
    return (n_pos.double() / tps[-1] * tps / (tps + fps)).sum()


def fpr_at_tpr_from_counts(n_pos: Tensor, n_neg: Tensor, tpr: float) -> Tensor:
    """FPR at the first point of the ROC curve (from ``(0, 0)``) whose TPR is at least ``tpr``."""
    fpr_curve, tpr_curve = roc_from_counts(n_pos, n_neg)
    level = torch.tensor([tpr], dtype=tpr_curve.dtype, device=tpr_curve.device)
    return fpr_curve[torch.searchsorted(tpr_curve, level)[0]]  # the curve ends at TPR 1 >= level


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float if it is in ``[0, 1]``, else ``ValueError``."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def roc_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Receiver operating characteristic with OOD as the positive class.

    :return: FPRs and TPRs (float64, from ``(0, 0)`` to ``(1, 1)``, one point per distinct score after the first)
        and the thresholds (float64, descending, one fewer than the rates): scikit-learn's
        ``roc_curve(..., drop_intermediate=False)`` without its leading ``inf`` threshold
    :raises ValueError: on mismatched shapes, NaN scores, or data without ID or without OOD samples
    """
    values, n_ood, n_id = descending_counts(scores, labels)
    fpr, tpr = roc_from_counts(n_ood, n_id)
    return fpr, tpr, values


def pr_curve(scores: Tensor, labels: Tensor, positive: str = "ood") -> tuple[Tensor, Tensor, Tensor]:
    """Precision-recall curve as scikit-learn's ``precision_recall_curve``: one point per distinct score, recall
    decreasing, ending at precision 1, recall 0.

    :param positive: the positive class, ``"ood"`` or ``"id"`` (then lower outlier scores are more positive)
    :return: precisions and recalls (float64), and the thresholds on the outlier score (ascending for ``"ood"``,
        descending for ``"id"``; one fewer than the points)
    :raises ValueError: as :func:`roc_curve`, or on an unknown ``positive``
    """
    _check_positive(positive)
    values, n_ood, n_id = descending_counts(scores, labels)
    n_pos, n_neg = (n_ood, n_id) if positive == "ood" else (n_id.flip(0), n_ood.flip(0))
    thresholds = values if positive == "ood" else values.flip(0)  # most positive first
    tps, fps = n_pos.cumsum(0).double(), n_neg.cumsum(0).double()
    precision, recall = tps / (tps + fps), tps / tps[-1]
    one = precision.new_ones(1)
    return torch.cat([precision.flip(0), one]), torch.cat([recall.flip(0), one - 1]), thresholds.flip(0)


def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve: the probability that a random OOD sample scores higher than a random ID sample,
    ties counting one half. A float64 scalar.

    :raises ValueError: as :func:`roc_curve`
    """
    _, n_ood, n_id = descending_counts(scores, labels)
    fpr, tpr = roc_from_counts(n_ood, n_id)
    return torch.trapezoid(tpr, fpr)


def aupr(scores: Tensor, labels: Tensor, positive: str = "ood") -> Tensor:
    """Area under the PR curve as average precision (module docstring): AUPR-OUT for ``positive="ood"``, AUPR-IN
    for ``"id"``. A float64 scalar.

    :raises ValueError: as :func:`pr_curve`
    """
    _check_positive(positive)
    _, n_ood, n_id = descending_counts(scores, labels)
    if positive == "ood":
        return average_precision_from_counts(n_ood, n_id)
    return average_precision_from_counts(n_id.flip(0), n_ood.flip(0))


def fpr_at_tpr(scores: Tensor, labels: Tensor, tpr: float = 0.95) -> Tensor:
    """FPR at the first threshold whose TPR (OOD detected) is at least ``tpr``, a float64 scalar.

    pytorch-ood 0.4.0's functional signature (labels ``< 0`` = OOD); :func:`ood_core.metrics.fpr_at_tpr` keeps the
    older ``(pred, target, k)`` with ``target == 1`` for OOD.

    :raises ValueError: as :func:`roc_curve`, or if ``tpr`` is not in ``[0, 1]``
    """
    check_fraction("tpr", tpr)
    _, n_ood, n_id = descending_counts(scores, labels)
    return fpr_at_tpr_from_counts(n_ood, n_id, tpr)


def autc_from_moments(
    sum_id: Tensor, n_id: Tensor, sum_ood: Tensor, n_ood: Tensor, low: Tensor, high: Tensor
) -> Tensor:
    """AUTC from the sums and counts of ID and OOD scores and the score range (float64)."""
    mean_id, mean_ood = sum_id / n_id, sum_ood / n_ood
    return ((mean_id - low) + (high - mean_ood)) / (2 * (high - low))


def autc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the threshold curve (module docstring), in ``[0, 1]``, *lower is better*: the mean of the areas
    under the FPR and the FNR curves over thresholds :math:`\\tau \\in [0, 1]` on the min-max normalized scores,

    .. math:: \\int_0^1 \\mathrm{FPR} = \\frac{1}{N_{id}} \\sum_{y_i \\geq 0} s'_i, \\qquad
        \\int_0^1 \\mathrm{FNR} = \\frac{1}{N_{ood}} \\sum_{y_i < 0} (1 - s'_i).

    The paper assumes scores in :math:`[0, 1]`; normalizing over the evaluated samples (as pytorch-ood does) makes
    it defined for any score range. A float64 scalar.

    :raises ValueError: on mismatched shapes, non-finite or constant scores, or data without ID or OOD samples
    """
    scores, labels = flatten_pair(scores, labels)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("AUTC requires finite scores")
    s, ood = scores.double(), labels < 0
    n_ood = ood.sum()
    check_both(s, n_ood, (~ood).sum())
    low, high = s.min(), s.max()
    if bool(low == high):
        raise ValueError("AUTC is undefined for constant scores")
    sum_ood = s.masked_select(ood).sum()
    return autc_from_moments(s.sum() - sum_ood, (~ood).sum().double(), sum_ood, n_ood.double(), low, high)


def accuracy(predictions: Tensor, labels: Tensor) -> Tensor:
    """Closed-set accuracy on the ID samples (labels ``>= 0``); OOD samples are ignored. A float64 scalar.

    :raises ValueError: on mismatched shapes or without ID samples
    """
    predictions, labels = flatten_pair(predictions, labels)
    known = labels >= 0
    n_known = int(known.sum())
    if n_known == 0:
        raise ValueError("accuracy requires ID samples (labels >= 0)")
    return ((predictions == labels) & known).sum().double() / n_known
