"""The OOD metrics collection, streaming and exact: AUROC, AUPR-IN, AUPR-OUT and FPR at a TPR level.

API of pytorch-ood's ``pytorch_ood.utils.OODMetrics`` (``update`` / ``compute`` / ``reset``; OOD samples
carry labels < 0 and are the *positive* class; higher scores mean more OOD). Definitions follow
Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples" (ICLR 2017)
and Liang et al., "Enhancing the Reliability of OOD Image Detection in Neural Networks" (ODIN, ICLR 2018):

- ``AUROC``: area under the ROC curve (trapezoidal rule over every distinct threshold), the probability
  that a random OOD sample scores higher than a random ID sample (ties count one half).
- ``AUPR-OUT``: average precision with OOD as positive, :math:`\\sum_k (R_k - R_{k-1}) P_k` over the
  descending distinct thresholds (scikit-learn's ``average_precision_score``; pytorch-ood integrates
  the PR curve with the trapezoidal rule instead, which is optimistic).
- ``AUPR-IN``: the same with ID as positive and negated scores.
- ``FPR95TPR``: the share of ID samples flagged at the first (highest) threshold whose TPR on OOD is
  at least ``fpr_at`` (0.95), i.e. ``fpr[argmax(tpr >= 0.95)]`` of scikit-learn's
  ``roc_curve(..., drop_intermediate=False)``. Tied scores are one threshold, as in ``roc_curve``.
  For another level the key is ``FPR{100 * fpr_at:g}TPR`` (e.g. ``FPR90TPR``).

Streaming: instead of buffering every score, :class:`OODMetrics` keeps a histogram
``distinct score -> (#ID, #OOD)`` merged at each update, so memory grows with the number of distinct
scores, not with the number of updates, and the metrics are exactly those of scikit-learn on the raw data.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import Tensor

from ood_core.metrics.histogram import ScoreHistogram, count_by_score

__all__ = ["OODMetrics", "fpr_at_tpr", "fpr_key", "metrics_from_counts", "ood_metrics"]

MODES = ("classification", "segmentation", "segmentation-per-image")


def fpr_key(level: float) -> str:
    """Name of the FPR metric at TPR ``level``: ``0.95 -> "FPR95TPR"``."""
    return f"FPR{round(100 * level, 6):g}TPR"


def _average_precision(n_pos: Tensor, n_neg: Tensor) -> Tensor:
    """AP over thresholds in the given order: ``sum_k (n_pos_k / P) * TP_k / (TP_k + FP_k)``."""
    tps, fps = n_pos.cumsum(0).double(), n_neg.cumsum(0).double()
    return (n_pos.double() / tps[-1] * tps / (tps + fps)).sum()


def metrics_from_counts(n_id: Tensor, n_ood: Tensor, fpr_at: float = 0.95) -> dict[str, float]:
    """Metrics from per-threshold counts of ID / OOD samples, thresholds sorted by *ascending* score.

    :raises ValueError: if there are no ID or no OOD samples
    """
    if int(n_ood.sum()) == 0 or int(n_id.sum()) == 0:
        raise ValueError("Data must contain ID and OOD samples.")
    pos, neg = n_ood.flip(0), n_id.flip(0)  # descending thresholds
    tps, fps = pos.cumsum(0).double(), neg.cumsum(0).double()
    tpr, fpr = tps / tps[-1], fps / fps[-1]
    zero = tpr.new_zeros(1)
    auroc = torch.trapezoid(torch.cat([zero, tpr]), torch.cat([zero, fpr]))
    first = int(torch.nonzero(tpr >= fpr_at)[0, 0])
    return {
        "AUROC": float(auroc),
        "AUPR-IN": float(_average_precision(n_id, n_ood)),  # ascending score = descending -score
        "AUPR-OUT": float(_average_precision(pos, neg)),
        fpr_key(fpr_at): float(fpr[first]),
    }


class OODMetrics:
    """Accumulates outlier scores and labels batch by batch and computes OOD metrics (module docstring).

    .. code-block:: python

        metrics = OODMetrics()
        for x, y in loader:  # OOD samples have y < 0
            metrics.update(detector(x), y)
        print(metrics.compute())  # {"AUROC": ..., "AUPR-IN": ..., "AUPR-OUT": ..., "FPR95TPR": ...}

    Modes (``scores`` and ``y`` always have the same shape):

    - ``"classification"``: any shape; every entry is one sample.
    - ``"segmentation"``: ``B x H x W`` (any shape works); all pixels of all images are pooled, the
      usual pixel-level metric. *Differs from pytorch-ood*, whose ``"segmentation"`` averages per image.
    - ``"segmentation-per-image"``: ``B x ...``; metrics are computed per image over its pixels and
      averaged over images. Images without both ID and OOD pixels (after dropping void) are skipped
      (pytorch-ood raises instead); ``compute`` adds ``"images"``, the number of images averaged.

    :param device: where the accumulated counts are kept
    :param mode: one of ``"classification"``, ``"segmentation"``, ``"segmentation-per-image"``
    :param void_label: entries with this label (any value, including 0 or a negative one) are ignored
    :param fpr_at: TPR level for the FPR metric (key ``FPR95TPR`` for 0.95)
    :raises ValueError: on an unknown mode or ``fpr_at`` outside ``(0, 1]``
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        mode: str = "classification",
        void_label: int | float | None = None,
        fpr_at: float = 0.95,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 < fpr_at <= 1.0:
            raise ValueError(f"fpr_at must be in (0, 1], got {fpr_at}")
        self.device = torch.device(device)
        self.mode = mode
        self.void_label = void_label
        self.fpr_at = float(fpr_at)
        self.reset()

    def reset(self) -> Self:
        """Forget all data seen so far."""
        self._counts = ScoreHistogram(self.device)  # negatives = ID, positives = OOD
        self._image_sums: dict[str, float] = {}
        self._images = 0
        self._correct = 0
        self._known = 0
        return self

    @property
    def num_distinct_scores(self) -> int:
        """Number of histogram entries kept (the memory footprint; 0 in per-image mode)."""
        return len(self._counts)

    @torch.no_grad()
    def update(self, scores: Tensor, y: Tensor, predictions: Tensor | None = None) -> Self:
        """Add a batch.

        :param scores: outlier scores, any shape (``B x H x W`` for segmentation); larger = more OOD
        :param y: labels of the same shape; values < 0 mark OOD
        :param predictions: optional predicted classes of the same shape; ``compute`` then adds ``"ACC"``,
            the accuracy on the ID (non-void) entries
        :raises ValueError: on mismatched shapes or NaN scores
        """
        scores, y = torch.as_tensor(scores).detach(), torch.as_tensor(y).detach().to(scores.device)
        if scores.shape != y.shape:
            raise ValueError(f"scores and labels must have the same shape, got {scores.shape} and {y.shape}")
        if scores.is_floating_point() and bool(torch.isnan(scores).any()):
            raise ValueError("scores contain NaN")
        keep = torch.ones_like(y, dtype=torch.bool) if self.void_label is None else y != self.void_label
        if predictions is not None:
            predictions = torch.as_tensor(predictions).detach().to(y.device)
            if predictions.shape != y.shape:
                raise ValueError(f"predictions must have the shape of the labels, got {predictions.shape}")
            known = keep & (y >= 0)
            self._correct += int(((predictions == y) & known).sum())
            self._known += int(known.sum())
        if self.mode == "segmentation-per-image":
            if scores.dim() < 2:
                raise ValueError(f"per-image mode expects B x H x W inputs, got shape {tuple(scores.shape)}")
            flat_scores, flat_y, flat_keep = (t.reshape(t.shape[0], -1) for t in (scores, y, keep))
            for img_scores, img_y, img_keep in zip(flat_scores, flat_y, flat_keep, strict=True):
                if self.void_label is None:
                    self._add_image(img_scores, img_y < 0)
                else:
                    self._add_image(img_scores.masked_select(img_keep), img_y.masked_select(img_keep) < 0)
        elif self.void_label is None:
            self._counts.add(scores.reshape(-1), y.reshape(-1) < 0)
        else:
            # masked_select: boolean indexing goes through a much slower nonzero() on CPU
            self._counts.add(scores.masked_select(keep), y.masked_select(keep) < 0)
        return self

    def _add_image(self, scores: Tensor, is_ood: Tensor) -> None:
        n_ood = int(is_ood.sum())
        if n_ood == 0 or n_ood == is_ood.numel():
            return  # needs both ID and OOD pixels
        _, n_id_counts, n_ood_counts = count_by_score(scores, is_ood)
        for key, value in metrics_from_counts(n_id_counts, n_ood_counts, self.fpr_at).items():
            self._image_sums[key] = self._image_sums.get(key, 0.0) + value
        self._images += 1

    def compute(self) -> dict[str, float]:
        """The metrics of all data seen since the last :meth:`reset`.

        :raises ValueError: if the data lack ID or OOD samples (per image: no image had both)
        """
        if self.mode == "segmentation-per-image":
            if self._images == 0:
                raise ValueError("Data must contain images with both ID and OOD pixels.")
            result = {key: total / self._images for key, total in self._image_sums.items()}
            result["images"] = float(self._images)
        else:
            result = metrics_from_counts(self._counts.n_neg, self._counts.n_pos, self.fpr_at)
        if self._known:
            result["ACC"] = self._correct / self._known
        return result


def ood_metrics(
    scores: Tensor,
    y: Tensor,
    fpr_at: float = 0.95,
    void_label: int | float | None = None,
    mode: str = "classification",
) -> dict[str, float]:
    """One-shot version of :class:`OODMetrics`: ``OODMetrics(...).update(scores, y).compute()``."""
    return OODMetrics(scores.device, mode, void_label, fpr_at).update(scores, y).compute()


def fpr_at_tpr(pred: Tensor, target: Tensor, k: float = 0.95) -> float:
    """FPR at the first threshold with TPR >= ``k`` (pytorch-ood's signature: ``target`` is 1 for OOD,
    0 for ID)."""
    _, n_id, n_ood = count_by_score(pred.detach(), target.detach() == 1)
    return metrics_from_counts(n_id, n_ood, k)[fpr_key(k)]
