"""SCALE: activation scaling without pruning.

Xu, Chen, Franchi, Yao: "Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
ICLR 2024 (code: github.com/kai422/SCALE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ood_core.detector.ash import ActivationShapingDetector, check_percentile, exp_ratio, top_k_per_sample


class SCALE(ActivationShapingDetector):
    r"""Scale all activations of a sample by :math:`\exp(s_1 / s_2)`, then score the head's logits (energy
    by default). :math:`s_1` is the sum of all :math:`n` flattened activations and :math:`s_2` the sum of the
    top :math:`k = n - \mathrm{round}(n p)` (at least 1). Unlike ASH-S, nothing is pruned: the top-k only
    set the factor. The paper finds pruning hurts OOD detection while the scaling helps, and applies SCALE
    to the feature maps before the last average pooling.

    The factor is a positive per-sample constant, so for a positively homogeneous head (average pooling and
    a linear layer without bias) the predicted class does not change; a bias can change it.

    :param percentile: fraction :math:`p \in [0, 1]` of the activations outside the top-k (default 0.85, the
        :math:`p` the paper also uses for ISH; ASH's default is 0.65)
    """

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        percentile: float = 0.85,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__(backbone, head, detector)
        self.percentile = check_percentile(percentile)

    def hparams(self) -> dict[str, Any]:
        return {"percentile": self.percentile, **self._score_hparams()}

    @staticmethod
    def scale(x: Tensor, percentile: float = 0.85) -> Tensor:
        """``x * exp(s1 / s2)`` per sample, ``s1`` = sum of all activations, ``s2`` = sum of the top-k."""
        flat, values, _ = top_k_per_sample(x, percentile)
        factor = exp_ratio(flat.sum(dim=1), values.sum(dim=1))
        return (flat * factor[:, None]).reshape(x.shape)

    def shape(self, activations: Tensor) -> Tensor:
        return SCALE.scale(activations, self.percentile)
