"""NNGuide: nearest-neighbour guidance of the energy score.

Park, Jung, Teoh: "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023
(arXiv:2309.14888; code: github.com/roomo7time/nnguide).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor
from torch.nn import functional

from ood_core.api import InvalidStateError, TensorSpec
from ood_core.detector.head_features import HeadFeaturesDetector, id_rows

#: most elements of one ``queries x bank`` similarity block (64 MiB in float32)
MAX_BLOCK_ELEMENTS = 1 << 24


def energy(logits: Tensor) -> Tensor:
    r""":math:`E = \log \sum_i e^{l_i}` per row (the paper's confidence: larger for ID), in float32."""
    return torch.logsumexp(logits.to(torch.float32), dim=1)


def top_k_mean(queries: Tensor, bank: Tensor, k: int) -> Tensor:
    """Mean of the ``k`` largest inner products of every query row with the bank rows, exact: blocks of at
    most ``MAX_BLOCK_ELEMENTS`` similarities (one GEMM each), the running top-k merged over bank chunks."""
    n = bank.shape[0]
    rows = max(1, MAX_BLOCK_ELEMENTS // max(n, 1))
    chunk = min(n, max(k, MAX_BLOCK_ELEMENTS // max(1, min(rows, queries.shape[0]))))
    means = []
    for q in queries.split(rows):
        top = q.new_empty(q.shape[0], 0)
        for part in bank.split(chunk):
            sims = torch.cat([top, q @ part.T], dim=1)
            top = sims.topk(min(k, sims.shape[1]), dim=1).values
        means.append(top.mean(dim=1))
    return torch.cat(means) if means else queries.new_zeros(0)


class NNGuide(HeadFeaturesDetector):
    r"""Outlier score = minus the energy of the input guided by its similarity to a bank of ID features:

    .. math:: s(x) = -E(x) \cdot \frac{1}{k} \sum_{z \in \mathcal N_k(x)}
        \big\langle \hat f(x),\; E(z)\, \hat f(z) \big\rangle, \qquad \hat f = f / \lVert f \rVert_2,
        \quad E = \log \sum_i e^{l_i}

    The bank holds the normalized features of the fit samples scaled by their energy; :math:`\mathcal N_k(x)`
    are the :math:`k` bank entries with the largest inner products (Park et al. 2023, Eq. 6-8; the paper's
    confidence is :math:`-s`). The paper builds the bank from a random subset of the training data (1% on
    ImageNet): fit on such a subset. The search is exhaustive (blocks of one float32 GEMM each). The bank,
    float32 ``N x D``, is the state; samples labelled < 0 are not added to it. The head is needed both to
    fit (the bank's energies) and to score.

    :param encoder: network mapping inputs to ``B x D`` features (may be ``None`` for the ``*_features`` methods)
    :param head: maps features to logits
    :param k: number of nearest bank entries averaged
    """

    requires_fit = True
    state_spec = {"bank": TensorSpec(("N", "D"))}

    def __init__(
        self, encoder: Callable[[Tensor], Tensor] | None, head: Callable[[Tensor], Tensor] | None, k: int = 10
    ) -> None:
        super().__init__(encoder, head)
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)

    def hparams(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        detector = super().from_state(hparams, tensors, modules)
        bank = tensors.get("bank")  # absent from a fit checkpoint taken before the bank was built
        if bank is not None and bank.shape[0] < detector.k:
            raise ValueError(f"bank has {bank.shape[0]} entries, fewer than k={detector.k}")
        return detector

    @property
    def feature_dim(self) -> int | None:
        return int(self.bank.shape[1]) if self.bank.dim() == 2 and self.bank.numel() else None

    def check_state(self) -> None:
        """A finite bank of at least ``k`` entries."""
        super().check_state()
        if self.bank.dim() != 2 or self.bank.shape[0] < self.k:
            raise InvalidStateError(f"NNGuide bank has {self.bank.shape[0]} entries: it needs at least k={self.k}")

    def scaled_features(self, z: Tensor) -> Tensor:
        r""":math:`E(z)\, \hat f(z)` of ``B x D`` features (float32): what the bank holds."""
        z = self.check_features("NNGuide", z)
        return functional.normalize(z.to(torch.float32), dim=1) * energy(self.logits(z))[:, None]

    # ------------------------------------------------------------------ fit (the bank: rows of every batch)
    def _begin_fit(self) -> None:
        self._parts: list[Tensor] = []

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        rows = id_rows(self.check_features("NNGuide", z.detach()), y)
        if self._parts and rows.shape[1] != self._parts[0].shape[1]:
            raise ValueError(f"NNGuide: batch has {rows.shape[1]} features, earlier batches {self._parts[0].shape[1]}")
        if rows.shape[0]:
            self._parts.append(self.scaled_features(rows))

    def _fit_statistics(self) -> dict[str, Tensor]:
        """The bank entries so far (``bank``, ``N x D`` float32): merging appends them."""
        if not self._parts:
            return {}
        self._parts = [torch.cat(self._parts)]
        return {"bank": self._parts[0]}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        bank = stats.get("bank")
        if set(stats) != {"bank"} or bank is None or bank.dim() != 2:
            raise ValueError(f"NNGuide statistics must be one N x D 'bank', got {sorted(stats)}")
        if self._parts and bank.shape[1] != self._parts[0].shape[1]:
            raise ValueError(
                f"NNGuide: bank entries have {bank.shape[1]} dimensions, this one {self._parts[0].shape[1]}"
            )
        device = self._parts[0].device if self._parts else self.device
        self._parts.append(bank.to(device, torch.float32))

    def _finish_fit(self) -> None:
        parts, self._parts = self._parts, []
        bank = torch.cat(parts) if parts else torch.empty(0, 0)
        if bank.shape[0] < self.k:
            raise ValueError(f"NNGuide needs at least k={self.k} ID samples (label >= 0), got {bank.shape[0]}")
        self.bank = bank

    # ------------------------------------------------------------------ scores
    def predict_features(self, z: Tensor) -> Tensor:
        """:param z: ``B x D`` features; returns ``B`` scores (float32, on the bank's device)"""
        self._check_fitted()
        z = self.check_features("NNGuide", z.detach(), self.bank.shape[1])
        confidence = energy(self.logits(z))
        queries = functional.normalize(self._to_device(z).to(torch.float32), dim=1)
        guidance = top_k_mean(queries, self.bank, self.k)
        return -(guidance * self._to_device(confidence))
