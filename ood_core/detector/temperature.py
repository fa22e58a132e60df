"""Temperature scaling: a single temperature fitted on held-out data, then the maximum softmax score.

Guo, Pleiss, Sun, Weinberger: "On Calibration of Modern Neural Networks", ICML 2017.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask

TEMPERATURE_RANGE = (1e-2, 1e2)
"""The interval the fitted temperature is kept in (see :class:`TemperatureScaling`)."""


class TemperatureScaling(Detector):
    r"""Outlier score = negative maximum softmax probability at the fitted temperature :math:`T`:

    .. math:: -\max_y \sigma_y(f(x) / T), \qquad
        T = \arg\min_{T > 0} -\frac{1}{N} \sum_{n} \log \sigma_{y_n}(f(x_n) / T)

    :math:`T` minimises the negative log-likelihood of the labelled ID validation data (OOD labels < 0 are
    ignored) within :data:`TEMPERATURE_RANGE` = :math:`[10^{-2}, 10^{2}]`. The NLL is convex in
    :math:`\beta = 1/T` (a log-sum-exp minus a linear term), with derivative
    :math:`g(\beta) = \frac{1}{N} \sum_n (\mathbb E_{\sigma(\beta f(x_n))}[f(x_n)] - f_{y_n}(x_n))`
    increasing in :math:`\beta`; :math:`T` is found by bisection of the sign of :math:`g` over :math:`\log T`,
    in float64, so it is the exact unbounded optimum whenever that lies inside the range, and otherwise the
    nearer bound. The bound matters on perfectly separable data (every label the arg-max): there the NLL keeps
    falling as :math:`T \to 0` and an unbounded fit collapses :math:`T` towards 0 (or, when every label is
    wrong, grows it without end); the fit then stops at :math:`10^{-2}` (:math:`10^{2}`). The fitted
    temperature is the state buffer ``t`` (a scalar). Fitting and scoring work on
    ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits with ``B x H x W`` labels
    (scores ``B x H x W``).

    :param model: network that outputs logits (may be ``None`` for the ``*_features`` methods)
    """

    input_kind = "logits"
    supports_segmentation = True
    requires_fit = True
    state_spec: ClassVar[dict[str, TensorSpec]] = {"t": TensorSpec(())}

    t: Tensor

    def __init__(self, model: Any = None) -> None:
        super().__init__()
        self.model = model

    def check_state(self) -> None:
        """A finite temperature ``t > 0`` (at 0 or below the scores are NaN or reversed)."""
        super().check_state()
        if not float(self.t) > 0.0:
            raise InvalidStateError(f"TemperatureScaling tensor 't' must be > 0, got {float(self.t):.4g}")

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        # keep only the labelled ID rows (pixels for segmentation), flattened to N x C
        logits = z.movedim(1, -1).reshape(-1, z.shape[1])
        labels = y.reshape(-1).to(logits.device)
        known = known_mask(labels)
        self._fit_buffer.append((logits[known].detach(), labels[known]))

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        """Statistics are the labelled ID logits, ``z`` (``N x C``) and ``y`` (``N``), gathered: the likelihood
        of a temperature has no smaller sufficient statistic."""
        if stats:
            z, y = stats.get("z"), stats.get("y")
            if set(stats) != {"z", "y"} or z is None or y is None:
                raise ValueError(f"TemperatureScaling statistics must be 'z' and 'y', got {sorted(stats)}")
            if z.dim() != 2 or y.shape != z.shape[:1] or not z.is_floating_point() or y.is_floating_point():
                raise ValueError(
                    "TemperatureScaling statistics must be float logits 'z' N x C and integer labels 'y' N"
                )
            if self._fit_buffer and (classes := self._fit_buffer[0][0].shape[1]) != z.shape[1]:
                raise ValueError(f"TemperatureScaling statistics have {z.shape[1]} classes, this fit {classes}")
        super()._merge_fit_statistics(stats)

    def _fit_all(self, z: Tensor, y: Tensor) -> None:
        if z.shape[0] == 0:
            raise ValueError("TemperatureScaling: no ID samples (labels >= 0) to fit on")
        self.t = self.optimal_temperature(z, y.to(z.device)).to(torch.float32)

    @staticmethod
    def optimal_temperature(
        logits: Tensor, labels: Tensor, max_iter: int = 100, bounds: tuple[float, float] = TEMPERATURE_RANGE
    ) -> Tensor:
        """Temperature in ``bounds`` minimising the NLL of ``labels`` under ``softmax(logits / T)``: bisection of
        the sign of the NLL's derivative over ``log T`` (at most ``max_iter`` halvings, stopping once the
        interval is below ``1e-12`` in ``log T``); returns a float64 scalar."""
        lo_t, hi_t = bounds
        if not 0.0 < lo_t <= hi_t:
            raise ValueError(f"temperature bounds must satisfy 0 < low <= high, got {bounds}")
        logits = logits.detach().to(torch.float64)
        labels = labels.to(device=logits.device, dtype=torch.long)
        target = logits.gather(1, labels[:, None]).mean()

        def slope(log_t: float) -> float:
            """The derivative's sign at ``T = exp(log_t)``: ``< 0`` means a lower temperature fits better."""
            z = logits * math.exp(-log_t)
            return float(logits.mul(z.softmax(dim=1)).sum(dim=1).mean() - target)

        lo, hi = math.log(lo_t), math.log(hi_t)
        if slope(lo) <= 0.0:  # the NLL still falls at the lowest temperature (e.g. separable data)
            return torch.tensor(lo_t, dtype=torch.float64, device=logits.device)
        if slope(hi) >= 0.0:  # ... or still falls at the highest (every label against the logits)
            return torch.tensor(hi_t, dtype=torch.float64, device=logits.device)
        for _ in range(max_iter):
            if hi - lo < 1e-12:
                break
            mid = 0.5 * (lo + hi)
            if slope(mid) < 0.0:
                hi = mid
            else:
                lo = mid
        return torch.tensor(math.exp(0.5 * (lo + hi)), dtype=torch.float64, device=logits.device)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        self._check_fitted()
        return -(self._to_device(logits) / self.t).softmax(dim=1).amax(dim=1)
