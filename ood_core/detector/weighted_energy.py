"""Weighted energy-based score (WEBO).

Du, Wang, Cai, Li: "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR 2022.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from ood_core.api import Detector, TensorSpec


class WeightedEBO(Detector):
    r"""Outlier score = negative log of the class-weighted sum of exponentiated logits:

    .. math:: E(x) = -\log \sum_{i=1}^{C} \operatorname{relu}(w_i)\, e^{f_i(x)}

    The weights :math:`w` come from an ``nn.Linear(num_classes, 1)`` layer, e.g. trained with the VOS
    uncertainty loss. As in the authors' code, negative weights are clipped to zero and the layer's bias is not
    used (it is still saved, so the layer round-trips). Computed as a ``logsumexp`` of
    :math:`f_i + \log \operatorname{relu}(w_i)` for numerical stability. Works on ``B x C`` logits and, for
    segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``). Needs no fitting; the layer's ``weight``
    (``1 x C``) and ``bias`` (``1``) are the saved state.

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    :param weights: ``nn.Linear`` with ``C`` inputs and 1 output (or its ``1 x C`` / ``C`` weight tensor)
    """

    input_kind = "logits"
    supports_segmentation = True
    state_spec: ClassVar[dict[str, TensorSpec]] = {
        "weight": TensorSpec((1, "C")),
        "bias": TensorSpec((1,)),
    }

    weight: Tensor
    bias: Tensor

    def __init__(self, model: Any, weights: nn.Linear | Tensor) -> None:
        super().__init__()
        self.model = model
        if isinstance(weights, nn.Linear):
            if weights.out_features != 1:
                raise ValueError(f"weights must have one output, got {weights.out_features}")
            weight = weights.weight.detach()
            bias = weights.bias.detach() if weights.bias is not None else torch.zeros(1, device=weight.device)
        else:
            weight = torch.as_tensor(weights).detach().reshape(1, -1)
            bias = torch.zeros(1, device=weight.device)
        self.weight = weight.to(torch.float32).clone()
        self.bias = bias.to(torch.float32).reshape(1).clone()

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def weights(self) -> nn.Linear:
        """The weighting layer, rebuilt from the state (a copy)."""
        layer = nn.Linear(self.num_classes, 1, device=self.weight.device)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        layer = nn.Linear(tensors["weight"].shape[1], 1)
        with torch.no_grad():
            layer.weight.copy_(tensors["weight"])
            layer.bias.copy_(tensors["bias"])
        return cls(**modules, weights=layer, **hparams)

    @staticmethod
    def score(logits: Tensor, weights: nn.Module | Tensor) -> Tensor:
        """Weighted energy along the class axis (dim 1); ``weights`` is the layer or its weight tensor."""
        w = weights.weight if isinstance(weights, nn.Module) else weights
        w = torch.as_tensor(w).detach().to(device=logits.device, dtype=logits.dtype).reshape(-1)
        if w.numel() != logits.shape[1]:
            raise ValueError(f"{w.numel()} weights for {logits.shape[1]} classes")
        log_w = w.relu().log().reshape((1, -1) + (1,) * (logits.dim() - 2))
        return -torch.logsumexp(logits + log_w, dim=1)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(self._to_device(logits), self.weight)
