"""Temperature scaling: a single temperature fitted on held-out data, then the maximum softmax score.

Guo, Pleiss, Sun, Weinberger: "On Calibration of Modern Neural Networks", ICML 2017.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask


class TemperatureScaling(Detector):
    r"""Outlier score = negative maximum softmax probability at the fitted temperature :math:`T`:

    .. math:: -\max_y \sigma_y(f(x) / T), \qquad
        T = \arg\min_{T > 0} -\frac{1}{N} \sum_{n} \log \sigma_{y_n}(f(x_n) / T)

    :math:`T` minimises the negative log-likelihood of the labelled ID validation data (OOD labels < 0 are
    ignored). It is optimised with L-BFGS (strong-Wolfe line search) over :math:`\log T`, so it stays positive,
    in float64. The fitted temperature is the state buffer ``t`` (a scalar). Fitting and scoring work on
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
    def optimal_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> Tensor:
        """Temperature minimising the NLL of ``labels`` under ``softmax(logits / T)`` (L-BFGS over log T)."""
        logits = logits.detach().to(torch.float64)
        labels = labels.to(device=logits.device, dtype=torch.long)
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return log_t.detach().exp()

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        self._check_fitted()
        return -(self._to_device(logits) / self.t).softmax(dim=1).amax(dim=1)
