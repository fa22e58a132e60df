"""OOD detection metrics (pytorch-ood's ``pytorch_ood.metrics``): OOD samples carry labels ``< 0`` and are the
positive class; higher scores mean more OOD.

- :class:`OODMetrics` / :func:`ood_metrics` (:mod:`ood_core.metrics.ood`): AUROC, AUPR-IN, AUPR-OUT and FPR at a
  TPR level in one streaming pass, optionally the ID accuracy; segmentation modes. Also importable from
  :mod:`ood_core.utils`, the seed's path. :func:`fpr_at_tpr` here keeps the older ``(pred, target, k)`` signature
  (``target == 1`` for OOD); :func:`ood_core.metrics.functional.fpr_at_tpr` is 0.4.0's ``(scores, labels, tpr)``.
- One class per metric (:mod:`ood_core.metrics.classes`): :class:`AUROC`, :class:`AUPR`, :class:`FPRAtTPR`,
  :class:`AUTC`, :class:`Accuracy`, each with ``update`` / ``compute`` / ``reset``.
- Functions on all data at once (:mod:`ood_core.metrics.functional`): ``roc_curve``, ``pr_curve``, ``auroc``,
  ``aupr``, ``fpr_at_tpr``, ``autc``, ``accuracy``, and the open-set and calibration metrics
  :func:`oscr_score`, :func:`calc_openness` (:mod:`ood_core.metrics.open_set`), :func:`calibration_error`,
  :func:`aurra` (:mod:`ood_core.metrics.calibration_metrics`); their input checks in :mod:`ood_core.metrics.inputs`.

All curve metrics are exact (scikit-learn's values on the raw data, ties as one threshold) and streaming: they keep
a histogram of distinct scores (:mod:`ood_core.metrics.histogram`), not the samples.
"""

from ood_core.metrics import functional
from ood_core.metrics.classes import AUPR, AUROC, AUTC, Accuracy, FPRAtTPR, Metric
from ood_core.metrics.functional import aurra, calc_openness, calibration_error, oscr_score
from ood_core.metrics.ood import MODES, OODMetrics, fpr_at_tpr, fpr_key, metrics_from_counts, ood_metrics

__all__ = [
    "AUPR",
    "AUROC",
    "AUTC",
    "MODES",
    "Accuracy",
    "FPRAtTPR",
    "Metric",
    "OODMetrics",
    "aurra",
    "calc_openness",
    "calibration_error",
    "fpr_at_tpr",
    "fpr_key",
    "functional",
    "metrics_from_counts",
    "ood_metrics",
    "oscr_score",
]
