"""GradNorm: the l1 norm of the gradients of the KL divergence to the uniform distribution.

Huang, Geng, Li: "On the Importance of Gradients for Detecting Distributional Shifts in the Wild", NeurIPS 2021.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ood_core.detector.graduncertainty import ParameterGradientDetector, ParamFilter


class GradNorm(ParameterGradientDetector):
    r"""Outlier score = minus the :math:`\ell_1` norm of the gradients, w.r.t. the selected parameters, of the
    cross-entropy between the uniform distribution :math:`u` and the softmax at temperature :math:`T`:

    .. math:: s(x) = -\sum_w \left\lVert \frac{\partial \mathcal L(x)}{\partial w} \right\rVert_1, \qquad
        \mathcal L(x) = -\frac{1}{C} \sum_{c=1}^{C} \log \frac{e^{f_c(x)/T}}{\sum_{c'} e^{f_{c'}(x)/T}}

    :math:`\mathcal L` is :math:`D_{KL}(u \,\|\, \sigma(f(x)/T))` up to the constant :math:`\log C` (Huang et al.
    2021, Eq. 2-3); its gradient w.r.t. the logits is :math:`(\sigma(f(x)/T) - u) / T`, larger for confident (ID)
    predictions. The paper uses the last layer's weights only: ``param_filter=["fc.weight"]`` (or the name of
    your head). The paper's score is the norm itself (ID higher); here it is negated so that OOD scores higher,
    as in pytorch-ood. Per-sample gradients are computed ``micro_batch_size`` samples at a time (see
    :func:`~ood_core.detector.graduncertainty.per_sample_gradient_norms`). Needs the network in the loop
    (``input_kind = "input"``) and no fit.

    :param model: classifier returning ``B x C`` logits
    :param param_filter: which parameters :math:`w` (see :class:`~ood_core.detector.GradUncertainty`)
    :param micro_batch_size: samples whose per-sample gradients are computed at once (>= 1)
    :param temperature: temperature :math:`T` (> 0)
    """

    power = 1

    def __init__(
        self,
        model: nn.Module | None,
        param_filter: ParamFilter = None,
        micro_batch_size: int = 32,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(model, param_filter)
        if isinstance(micro_batch_size, bool) or int(micro_batch_size) != micro_batch_size or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size}")
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.micro_batch_size = int(micro_batch_size)
        self.temperature = float(temperature)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "micro_batch_size": self.micro_batch_size, "temperature": self.temperature}

    def loss(self, logits: Tensor) -> Tensor:
        """Cross-entropy of one sample's tempered softmax to the uniform distribution."""
        return -(logits / self.temperature).log_softmax(dim=1).mean()
