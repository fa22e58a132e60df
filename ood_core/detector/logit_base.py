"""Base classes of the detectors that score a network's logits with a fixed formula and need no fitting.

:class:`LogitDetector` holds what :class:`~ood_core.detector.Entropy` and :class:`~ood_core.detector.MaxLogit`
share: the ``model`` argument, ``input_kind = "logits"``, segmentation support and a :meth:`predict_features`
that applies the subclass's static ``score``. :class:`TemperatureLogitDetector` adds the temperature ``t`` of
:class:`~ood_core.detector.MaxSoftmax` and :class:`~ood_core.detector.EnergyBased`. Each detector keeps its
own module, docstring and static ``score`` (the formula); this module holds no formula.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch import Tensor

from ood_core.api import Detector


class LogitDetector(Detector):
    """A detector whose score is ``score(logits)``, a pure function of the logits along the class axis (dim 1).

    Works on ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``).

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    """

    input_kind = "logits"
    supports_segmentation = True

    def __init__(self, model: Any = None) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    @abstractmethod
    def score(logits: Tensor) -> Tensor:
        """Outlier scores of ``logits`` (higher means more OOD)."""

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(logits)


class TemperatureLogitDetector(LogitDetector):
    """A :class:`LogitDetector` whose score takes a temperature: ``score(logits, t)``.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    :param t: temperature, positive; ``None`` means 1
    """

    def __init__(self, model: Any = None, t: float | None = 1.0) -> None:
        super().__init__(model)
        self.t = 1.0 if t is None else float(t)
        if self.t <= 0:
            raise ValueError(f"temperature t must be positive, got {t}")

    def hparams(self) -> dict[str, Any]:
        return {"t": self.t}

    @staticmethod
    @abstractmethod
    def score(logits: Tensor, t: float | None = 1.0) -> Tensor:
        """Outlier scores of ``logits`` at temperature ``t`` (higher means more OOD)."""

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(logits, self.t)
