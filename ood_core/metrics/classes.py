"""One class per metric, fed batch by batch (pytorch-ood 0.4.0's ``AUROC``, ``AUPR``, ``FPRAtTPR``, ``AUTC``,
``Accuracy``): ``update(...)`` adds a batch, ``compute()`` returns ``{key: value}``, ``reset()`` forgets the data.

All of them are *streaming* and exact: the curve metrics keep the score histogram of
:mod:`ood_core.metrics.histogram` (memory grows with the number of distinct scores, not of samples), AUTC keeps
the sums, counts and range of the scores, accuracy two counts. Formulas: :mod:`ood_core.metrics.functional`.
Inputs of any shape are flattened; entries whose label equals ``void_label`` are dropped. The state lives on
``device`` or, if it is ``None``, on the device of the first batch.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import ClassVar, Self

import torch
from torch import Tensor

from ood_core.metrics import functional as F
from ood_core.metrics.histogram import ScoreHistogram
from ood_core.metrics.inputs import check_nan
from ood_core.metrics.ood import fpr_key

__all__ = ["AUPR", "AUROC", "AUTC", "Accuracy", "FPRAtTPR", "Metric"]


class Metric(ABC):
    """Base of the per-metric classes: input checks, ``void_label`` and the device.

    :param device: device of the state; ``None``: that of the first batch
    :param void_label: label of entries to ignore (e.g. unlabeled pixels), any value
    """

    #: names of the inputs of :meth:`update`, in order
    inputs: ClassVar[tuple[str, ...]] = ("scores", "labels")

    def __init__(self, *, device: str | torch.device | None = None, void_label: int | float | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.void_label = void_label
        self.reset()

    @property
    @abstractmethod
    def keys(self) -> tuple[str, ...]:
        """Keys of the dictionary :meth:`compute` returns."""

    @abstractmethod
    def reset(self) -> Self:
        """Forget all batches."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric over all batches since the last :meth:`reset`.

        :raises ValueError: if the data do not define the metric (e.g. no ID or no OOD samples)
        """

    def _prepare(self, values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Flattened, detached inputs without void entries, on the state's device."""
        values, labels = torch.as_tensor(values), torch.as_tensor(labels)
        if values.shape != labels.shape:
            raise ValueError(
                f"{type(self).__name__}: {self.inputs[0]} and labels must have the same shape, got "
                f"{tuple(values.shape)} and {tuple(labels.shape)}"
            )
        dev = self.device or values.device
        values, labels = values.detach().reshape(-1).to(dev), labels.detach().reshape(-1).to(dev)
        if self.void_label is not None:
            keep = labels != self.void_label
            values, labels = values.masked_select(keep), labels.masked_select(keep)
        return values, labels


class _CurveMetric(Metric):
    """A metric of the ROC / PR curve, computed from the score histogram (ID = negative, OOD = positive)."""

    def reset(self) -> Self:
        self._counts = ScoreHistogram(self.device)
        return self

    def update(self, scores: Tensor, labels: Tensor) -> Self:
        """Add a batch.

        :param scores: outlier scores, any shape; larger = more OOD
        :param labels: labels of the same shape; ``< 0`` marks OOD
        :raises ValueError: on mismatched shapes or NaN scores
        """
        scores, labels = self._prepare(scores, labels)
        check_nan(scores)
        self._counts.add(scores, labels < 0)
        return self

    def compute(self) -> dict[str, float]:
        _, n_ood, n_id = F.check_both(self._counts.values, self._counts.n_pos.flip(0), self._counts.n_neg.flip(0))
        return {self.keys[0]: float(self._from_counts(n_ood, n_id))}

    @abstractmethod
    def _from_counts(self, n_ood: Tensor, n_id: Tensor) -> Tensor:
        """The metric from counts per distinct score, in *descending* score order."""


class AUROC(_CurveMetric):
    """Area under the ROC curve, OOD positive (:func:`~ood_core.metrics.functional.auroc`): ``{"AUROC": ...}``.

    .. code-block:: python

        metric = AUROC()
        for x, y in loader:
            metric.update(detector(x), y)
        metric.compute()  # {"AUROC": ...}
    """

    @property
    def keys(self) -> tuple[str, ...]:
        return ("AUROC",)

    def _from_counts(self, n_ood: Tensor, n_id: Tensor) -> Tensor:
        fpr, tpr = F.roc_from_counts(n_ood, n_id)
        return torch.trapezoid(tpr, fpr)


class AUPR(_CurveMetric):
    """Area under the PR curve as average precision (:func:`~ood_core.metrics.functional.aupr`):
    ``{"AUPR-OUT": ...}`` with OOD positive, ``{"AUPR-IN": ...}`` for ``positive="id"``.

    :param positive: ``"ood"`` or ``"id"``
    """

    def __init__(
        self, positive: str = "ood", *, device: str | torch.device | None = None, void_label: int | float | None = None
    ) -> None:
        F._check_positive(positive)
        self.positive = positive
        super().__init__(device=device, void_label=void_label)

    @property
    def keys(self) -> tuple[str, ...]:
        return ("AUPR-OUT",) if self.positive == "ood" else ("AUPR-IN",)

    def _from_counts(self, n_ood: Tensor, n_id: Tensor) -> Tensor:
        if self.positive == "ood":
            return F.average_precision_from_counts(n_ood, n_id)
        return F.average_precision_from_counts(n_id.flip(0), n_ood.flip(0))


class FPRAtTPR(_CurveMetric):
    """FPR at the first threshold whose TPR reaches ``tpr`` (:func:`~ood_core.metrics.functional.fpr_at_tpr`):
    ``{"FPR95TPR": ...}`` for ``tpr=0.95``, ``{"FPR90TPR": ...}`` for 0.9.

    :param tpr: the TPR level, in ``[0, 1]``
    """

    def __init__(
        self, tpr: float = 0.95, *, device: str | torch.device | None = None, void_label: int | float | None = None
    ) -> None:
        self.tpr = F.check_fraction("tpr", tpr)
        super().__init__(device=device, void_label=void_label)

    @property
    def keys(self) -> tuple[str, ...]:
        return (fpr_key(self.tpr),)

    def _from_counts(self, n_ood: Tensor, n_id: Tensor) -> Tensor:
        return F.fpr_at_tpr_from_counts(n_ood, n_id, self.tpr)


class AUTC(Metric):
    """Area under the threshold curve, lower is better (:func:`~ood_core.metrics.functional.autc`): ``{"AUTC": ...}``.

    Streaming in constant memory: AUTC is linear in the per-class score means once the score range is known, so
    the sums, counts, minimum and maximum are kept. Constant or infinite scores make AUTC undefined: ``compute``
    then warns and returns NaN (as pytorch-ood does, so a collection still reports its other metrics).
    """

    @property
    def keys(self) -> tuple[str, ...]:
        return ("AUTC",)

    def reset(self) -> Self:
        self._moments: dict[str, Tensor] | None = None
        return self

    def update(self, scores: Tensor, labels: Tensor) -> Self:
        """Add a batch (see :meth:`AUROC.update`).

        :raises ValueError: on mismatched shapes or NaN scores
        """
        scores, labels = self._prepare(scores, labels)
        check_nan(scores)
        if scores.numel() == 0:
            return self
        s, ood = scores.double(), labels < 0
        sum_ood = s.masked_select(ood).sum()
        batch = {
            "sum_id": s.sum() - sum_ood,
            "n_id": (~ood).sum().double(),
            "sum_ood": sum_ood,
            "n_ood": ood.sum().double(),
            "low": s.min(),
            "high": s.max(),
        }
        if self._moments is None:
            self._moments = batch
        else:
            m = self._moments
            for key in ("sum_id", "n_id", "sum_ood", "n_ood"):
                m[key] = m[key] + batch[key]
            m["low"], m["high"] = torch.minimum(m["low"], batch["low"]), torch.maximum(m["high"], batch["high"])
        return self

    def compute(self) -> dict[str, float]:
        if self._moments is None:
            raise ValueError("Data must contain ID and OOD samples.")
        m = self._moments
        F.check_both(m["low"], m["n_ood"], m["n_id"])
        if not bool(torch.isfinite(m["low"]) & torch.isfinite(m["high"])) or bool(m["low"] == m["high"]):
            warnings.warn("AUTC is undefined for constant or infinite scores, returning NaN", stacklevel=2)
            return {"AUTC": float("nan")}
        value = F.autc_from_moments(m["sum_id"], m["n_id"], m["sum_ood"], m["n_ood"], m["low"], m["high"])
        return {"AUTC": float(value)}


class Accuracy(Metric):
    """Closed-set accuracy on the ID samples (labels ``>= 0``; OOD ignored): ``{"ACC": ...}``. Keeps two counts."""

    inputs = ("predictions", "labels")

    @property
    def keys(self) -> tuple[str, ...]:
        return ("ACC",)

    def reset(self) -> Self:
        self._correct = 0
        self._total = 0
        return self

    def update(self, predictions: Tensor, labels: Tensor) -> Self:
        """Add a batch.

        :param predictions: predicted classes, any shape; :param labels: labels of the same shape
        :raises ValueError: on mismatched shapes
        """
        predictions, labels = self._prepare(predictions, labels)
        known = labels >= 0
        self._correct += int(((predictions == labels) & known).sum())
        self._total += int(known.sum())
        return self

    def compute(self) -> dict[str, float]:
        if self._total == 0:
            raise ValueError("accuracy requires ID samples (labels >= 0)")
        return {"ACC": self._correct / self._total}
