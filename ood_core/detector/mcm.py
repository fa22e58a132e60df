"""Maximum Concept Matching (MCM): zero-shot OOD detection with a vision-language model's embeddings.

Ming, Cai, Gu, Sun, Li, Li: "Delving into Out-of-Distribution Detection with Vision-Language Representations",
NeurIPS 2022.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from ood_core.api import Detector, InvalidStateError, TensorSpec


class MCM(Detector):
    r"""Outlier score = minus the largest softmax of the scaled cosine similarities between the image embedding
    and the class concepts' text embeddings:

    .. math:: s(x) = -\max_k \frac{e^{\cos(z(x), t_k)/\tau}}{\sum_{j=1}^{C} e^{\cos(z(x), t_j)/\tau}}

    with :math:`z(x)` the image encoder's embedding (e.g. CLIP's ``encode_image``), :math:`t_k` the embedding of
    class :math:`k`'s prompt (e.g. ``"a photo of a <label>"`` through CLIP's text encoder) and temperature
    :math:`\tau` (Ming et al. 2022, Eq. 3; the paper's :math:`\tau = 1`). Both the image encoder and the text
    embeddings are the user's: nothing is downloaded. No fit; the state is the L2-normalized text embeddings
    (``C x D``, float32, normalized when the detector is built) and the temperature.

    :param encoder: image encoder, inputs -> ``B x D`` embeddings (may be ``None`` for :meth:`predict_features`)
    :param text_embeddings: ``C x D`` class text embeddings (normalized here if they are not)
    :param temperature: temperature :math:`\tau` (> 0)
    """

    state_spec = {"text_embeddings": TensorSpec(("C", "D"))}
    input_kind = "features"
    external_modules = ("encoder",)

    text_embeddings: Tensor

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        text_embeddings: Tensor,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if not isinstance(text_embeddings, Tensor) or text_embeddings.dim() != 2 or 0 in text_embeddings.shape:
            raise ValueError("text_embeddings must be a non-empty C x D tensor")
        if not bool(torch.isfinite(text_embeddings).all()):
            raise ValueError("text_embeddings must be finite")
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=1)
        self.temperature = float(temperature)

    def hparams(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        return cls(modules.get("encoder"), tensors["text_embeddings"], **hparams)

    @property
    def feature_dim(self) -> int | None:
        return int(self.text_embeddings.shape[1])

    @property
    def num_classes(self) -> int | None:
        return int(self.text_embeddings.shape[0])

    def check_state(self) -> None:
        """Finite text embeddings of unit norm."""
        super().check_state()
        norms = self.text_embeddings.double().norm(dim=1)
        if not bool(((norms - 1).abs() < 1e-4).all()):
            raise InvalidStateError("MCM 'text_embeddings' must be L2-normalized rows")

    def _extract(self, x: Tensor) -> Tensor:
        return self._require("encoder")(x)

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` image embeddings; returns ``B`` scores"""
        if x.dim() != 2 or x.shape[1] != self.text_embeddings.shape[1]:
            raise ValueError(f"MCM expects B x {self.text_embeddings.shape[1]} embeddings, got {tuple(x.shape)}")
        z = F.normalize(self._to_device(x.detach()).float(), dim=1)
        similarities = z @ self.text_embeddings.T / self.temperature
        return -similarities.softmax(dim=1).amax(dim=1)
