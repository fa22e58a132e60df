"""DICE: directed sparsification of the last layer.

Sun, Li: "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor
from torch.nn import functional

from ood_core.api import Detector, TensorSpec, known_mask, model_or_encoder, required
from ood_core.detector.ash import check_percentile
from ood_core.detector.scores import resolve_score_function, score_hparams


class DICE(Detector):
    r"""Score the logits of a sparsified last layer (energy by default).

    The contribution of feature :math:`j` to class :math:`c` is :math:`V_{cj} = \bar z_j W_{cj}`, with
    :math:`\bar z` the mean feature of the ID fit data. The mask :math:`M` keeps the weights with the top
    :math:`k = n - \mathrm{round}(n p)` of the :math:`n = C D` contributions (exactly :math:`k`, ties broken
    by ``torch.topk``) and drops the rest; scores are ``detector((M * W) z + b)``.

    ``p`` is the fraction of weights *dropped*, in [0, 1] (pytorch-ood takes it in [0, 100]; the paper
    uses 0.9 for CIFAR). The fit streams a float64 sum of the features and ignores OOD samples (label < 0).
    ``w``, ``b`` and the fitted ``mask`` make up the saved state.

    :param model: feature extractor (may be ``None`` for the ``*_features`` methods)
    :param w: ``C x D`` weight of the last layer
    :param b: ``C`` bias of the last layer
    :param p: fraction of weights to drop
    :param detector: maps logits to scores: a callable or a name of
        :data:`ood_core.detector.scores.SCORE_FUNCTION_NAMES`; only registered ones can be saved
    :param encoder: pytorch-ood 0.4's name for ``model`` (give one of them); ``w``, ``b`` and ``p`` are
        required either way
    """

    requires_fit = True
    input_kind = "features"
    state_spec = {
        "w": TensorSpec(("C", "D")),
        "b": TensorSpec(("C",)),
        "mask": TensorSpec(("C", "D"), torch.bool),
    }

    def __init__(
        self,
        model: Callable[[Tensor], Tensor] | None = None,
        w: Tensor | None = None,
        b: Tensor | None = None,
        p: float | None = None,
        detector: Callable[..., Tensor] | str | None = None,
        *,
        encoder: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        model = model_or_encoder(model, encoder, "DICE")
        required("DICE", w=w, b=b, p=p)
        assert p is not None
        w, b = torch.as_tensor(w).detach(), torch.as_tensor(b).detach()
        if w.dim() != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"DICE needs w of shape C x D and b of shape C, got {tuple(w.shape)}, {tuple(b.shape)}")
        self.model = model
        self.w = w.to(torch.float32).clone()
        self.b = b.to(device=self.w.device, dtype=torch.float32).clone()
        self.p = check_percentile(p, "p")
        self.detector = resolve_score_function(detector)

    def hparams(self) -> dict[str, Any]:
        return score_hparams("DICE", self.detector, p=self.p)

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        return cls(modules.get("model"), tensors["w"], tensors["b"], **hparams)

    @property
    def feature_dim(self) -> int | None:
        return int(self.w.shape[1])

    @property
    def num_classes(self) -> int | None:
        return int(self.w.shape[0])

    def _check_features(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.w.shape[1]:
            raise ValueError(f"DICE expects B x {self.w.shape[1]} features, got shape {tuple(z.shape)}")

    # ------------------------------------------------------------------ fit (streamed mean of ID features)
    def _begin_fit(self) -> None:
        self._feature_sum = torch.zeros(self.w.shape[1], dtype=torch.float64, device=self.w.device)
        self._count = 0

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        self._check_features(z)
        known = known_mask(torch.as_tensor(y).reshape(-1)).to(z.device)
        self._feature_sum += z[known].to(torch.float64).sum(dim=0).to(self._feature_sum.device)
        self._count += int(known.sum())

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``feature_sum`` (float64, ``D``) and ``count`` of the ID features; shards merge by addition."""
        if self._count == 0:
            return {}
        return {"feature_sum": self._feature_sum, "count": torch.tensor(self._count, dtype=torch.int64)}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        dim = self.w.shape[1]
        total, count = stats.get("feature_sum"), stats.get("count")
        if set(stats) != {"feature_sum", "count"} or total is None or count is None:
            raise ValueError(f"DICE statistics must be 'feature_sum' and 'count', got {sorted(stats)}")
        if total.shape != (dim,) or total.dtype != torch.float64 or count.shape != () or count.dtype != torch.int64:
            raise ValueError(f"DICE statistics must be a float64 'feature_sum' of {dim} and an int64 'count'")
        if int(count) < 0:
            raise ValueError("DICE statistics 'count' must be >= 0")
        self._feature_sum += total.to(self._feature_sum.device)
        self._count += int(count)

    def _finish_fit(self) -> None:
        if self._count == 0:
            raise ValueError("DICE: no ID samples (label >= 0) to fit on")
        mean = (self._feature_sum / self._count).to(torch.float32)
        self.mask = self.contribution_mask(mean, self.w, self.p)

    @staticmethod
    def contribution_mask(mean: Tensor, w: Tensor, p: float) -> Tensor:
        """Boolean ``C x D`` mask of the top ``n - round(n p)`` contributions ``mean[None, :] * w``."""
        contribution = (mean[None, :] * w).reshape(-1)
        kept = contribution.numel() - round(contribution.numel() * p)
        mask = torch.zeros(contribution.numel(), dtype=torch.bool, device=w.device)
        mask[torch.topk(contribution, kept).indices] = True
        return mask.reshape(w.shape)

    # ------------------------------------------------------------------ scores
    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features; scores on the state's device"""
        self._check_fitted()
        x = self._to_device(x)
        self._check_features(x)
        logits = functional.linear(x.to(self.w.dtype), self.w * self.mask, self.b)
        return self.detector(logits)
