"""pytorch-ood's ``pytorch_ood.utils`` import path for the metrics: ``from ood_core.utils import OODMetrics``."""

from __future__ import annotations

from ood_core.metrics import OODMetrics, fpr_at_tpr, ood_metrics

__all__ = ["OODMetrics", "fpr_at_tpr", "ood_metrics"]
