"""Simplified Hopfield Energy (SHE).

Zhang, Fu, Liu, Chen, Song, Li: "Out-of-Distribution Detection based on In-Distribution Data Patterns
Memorization with Modern Hopfield Energy", ICLR 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor

from ood_core.api import Detector, TensorSpec, known_mask, model_or_encoder


class SHE(Detector):
    r"""Outlier score = minus the inner product of the features with the stored pattern of the predicted
    class:

    .. math:: s(x) = -z^\top S_{\hat y}, \qquad \hat y = \arg\max_k \mathrm{head}(z)_k

    where :math:`S_k` is the mean feature of the training samples of class :math:`k` that the head
    classifies correctly. The fit streams: it keeps per-class sums (float64) and counts only, and ignores
    OOD samples (label < 0). Every class the head can predict needs at least one correct ID sample.

    :param model: feature extractor (``B x D`` features; may be ``None`` for the ``*_features`` methods)
    :param head: maps features to ``B x C`` logits
    :param encoder: pytorch-ood 0.4's name for ``model`` (give one of them)
    """

    requires_fit = True
    input_kind = "features"
    external_modules = ("model", "head")
    state_spec = {"patterns": TensorSpec(("C", "D"))}

    def __init__(
        self,
        model: Callable[[Tensor], Tensor] | None = None,
        head: Callable[[Tensor], Tensor] | None = None,
        *,
        encoder: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model_or_encoder(model, encoder, "SHE")
        self.head = head

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        return cls(model=modules.get("model"), head=modules.get("head"), **hparams)

    @property
    def feature_dim(self) -> int | None:
        return int(self.patterns.shape[1]) if self.patterns.numel() else None

    @property
    def num_classes(self) -> int | None:
        return int(self.patterns.shape[0]) if self.patterns.numel() else None

    def _logits(self, z: Tensor) -> Tensor:
        if z.dim() != 2:
            raise ValueError(f"SHE expects B x D features, got shape {tuple(z.shape)}")
        with torch.no_grad():
            return self._require("head")(z)

    # ------------------------------------------------------------------ fit (per-class sums of correct samples)
    def _begin_fit(self) -> None:
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        logits = self._logits(z)
        y = torch.as_tensor(y, device=z.device).reshape(-1)
        correct = known_mask(y) & (logits.argmax(dim=1) == y)
        classes = int(logits.shape[1])
        if self._sums is None or self._counts is None:
            self._sums = torch.zeros(classes, z.shape[1], dtype=torch.float64, device=z.device)
            self._counts = torch.zeros(classes, dtype=torch.float64, device=z.device)
        elif self._sums.shape != (classes, z.shape[1]):
            raise ValueError(
                f"SHE: batch gives {classes} classes x {z.shape[1]} features, earlier batches {tuple(self._sums.shape)}"
            )
        self._sums.index_add_(0, y[correct], z[correct].to(torch.float64))
        self._counts.index_add_(0, y[correct], torch.ones_like(y[correct], dtype=torch.float64))

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``sums`` (``C x D`` float64) and ``counts`` (``C`` float64) of the correct ID samples; merged by
        addition."""
        if self._sums is None or self._counts is None:
            return {}
        return {"sums": self._sums, "counts": self._counts}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        sums, counts = stats.get("sums"), stats.get("counts")
        if set(stats) != {"sums", "counts"} or sums is None or counts is None:
            raise ValueError(f"SHE statistics must be 'sums' and 'counts', got {sorted(stats)}")
        if sums.dim() != 2 or counts.shape != sums.shape[:1] or not sums.is_floating_point():
            raise ValueError("SHE statistics must be 'sums' C x D and 'counts' C")
        if self._sums is not None and sums.shape != self._sums.shape:
            raise ValueError(f"SHE statistics are {tuple(sums.shape)}, this fit {tuple(self._sums.shape)}")
        if bool((counts < 0).any()):
            raise ValueError("SHE statistics 'counts' must be >= 0")
        device = self._sums.device if self._sums is not None else self.device
        sums, counts = sums.to(device, torch.float64), counts.to(device, torch.float64)
        if self._sums is None or self._counts is None:
            self._sums, self._counts = sums.clone(), counts.clone()
        else:
            self._sums += sums
            self._counts += counts

    def _finish_fit(self) -> None:
        sums, counts = self._sums, self._counts
        if sums is None or counts is None or sums.shape[0] == 0:
            raise ValueError("SHE: no data to fit on")
        missing = (counts == 0).nonzero().reshape(-1).tolist()
        if missing:
            raise ValueError(f"SHE: no correctly classified ID sample for classes {missing}")
        self.patterns = (sums / counts[:, None]).to(torch.float32)

    # ------------------------------------------------------------------ scores
    def predict_features(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` features as given by the model; scores on the state's device"""
        self._check_fitted()
        y_hat = self._logits(z).argmax(dim=1)
        z, y_hat = self._to_device(z), self._to_device(y_hat)
        return -(z * self.patterns[y_hat]).sum(dim=1)
