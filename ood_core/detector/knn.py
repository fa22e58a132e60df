"""Deep nearest neighbours.

Sun, Ming, Zhu, Li: "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, TensorSpec, known_mask

#: most elements of one ``queries x bank`` similarity block (64 MiB in float32)
MAX_BLOCK_ELEMENTS = 1 << 24


def l2_normalize(z: Tensor) -> Tensor:
    """``z / ||z||`` per row; zero rows stay zero (the norm is clamped at 1e-12)."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


class KNN(Detector):
    r"""Outlier score = Euclidean distance to the :math:`k`-th nearest ID feature:

    .. math:: s(x) = \lVert z - z_{(k)} \rVert_2, \qquad z = \frac{f(x)}{\lVert f(x) \rVert_2}

    where :math:`z_{(k)}` is the :math:`k`-th closest of the (normalized) ID features kept at fit time (Sun et
    al. 2022; with ``normalize=False`` the raw features are used). The bank of ID features is the state.

    The search is exhaustive (exact) and needs no scikit-learn: queries are processed in blocks of at most
    ``MAX_BLOCK_ELEMENTS`` similarities against the whole bank, each block one float32 GEMM
    (:math:`\lVert a-b\rVert^2 = \lVert a\rVert^2 + \lVert b\rVert^2 - 2 a\cdot b`) followed by ``topk``; the
    :math:`k` selected neighbours' distances are then recomputed directly as :math:`\lVert z - b\rVert`, so the
    score carries no cancellation error. Memory: ``O(N·D)`` for the bank plus ``MAX_BLOCK_ELEMENTS`` floats.
    Labels < 0 are ignored when fitting.

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param k: rank of the neighbour whose distance is the score (the paper: 50 for CIFAR-10)
    :param normalize: L2-normalize ID and test features first (as in the paper)
    """

    state_spec = {"bank": TensorSpec(("N", "D"), torch.float32)}
    requires_fit = True
    input_kind = "features"

    def __init__(self, model: Any = None, k: int = 50, normalize: bool = True) -> None:
        super().__init__()
        self.model = model
        self.k = int(k)
        self.normalize = bool(normalize)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {k}")

    def hparams(self) -> dict[str, Any]:
        return {"k": self.k, "normalize": self.normalize}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> KNN:
        detector = cls(**modules, **hparams)
        if tensors["bank"].shape[0] < detector.k:
            raise ValueError(f"bank has {tensors['bank'].shape[0]} features, fewer than k={detector.k}")
        return detector

    @property
    def feature_dim(self) -> int | None:
        return int(self.bank.shape[1]) if self.is_fitted else None

    def _prepare(self, z: Tensor) -> Tensor:
        z = z.detach().flatten(1).to(torch.float32)
        return l2_normalize(z) if self.normalize else z

    def _begin_fit(self) -> None:
        self._parts: list[Tensor] = []

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        keep = known_mask(y.reshape(-1).to(z.device))
        part = self._prepare(z if bool(keep.all()) else z[keep])
        # own the memory: the bank must not alias the caller's tensor (normalization already copies)
        self._parts.append(part if self.normalize or part.data_ptr() != z.data_ptr() else part.clone())

    def _finish_fit(self) -> None:
        parts, self._parts = self._parts, []
        bank = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0)
        if bank.shape[0] == 0:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        if bank.shape[0] < self.k:
            raise ValueError(f"k={self.k} exceeds the number of ID samples ({bank.shape[0]})")
        self.bank = bank

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features; returns ``B`` distances to the k-th nearest ID feature"""
        self._check_fitted()
        z = self._prepare(self._to_device(x))
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        bank = self.bank
        bank_sq = None if self.normalize else (bank * bank).sum(1)
        rows = max(1, min(MAX_BLOCK_ELEMENTS // bank.shape[0], MAX_BLOCK_ELEMENTS // (self.k * bank.shape[1])))
        scores = [self._kth_distance(q, bank_sq) for q in z.split(rows)]
        return torch.cat(scores).to(out_dtype) if scores else z.new_zeros(0, dtype=out_dtype)

    def _kth_distance(self, q: Tensor, bank_sq: Tensor | None) -> Tensor:
        """Exact k-th nearest distances for a block of queries: top-k by similarity over the whole bank (one
        GEMM: larger = closer, ``a.b`` for unit vectors, ``a.b - |b|^2 / 2`` in general as ``|a|^2`` is constant
        per row), then the selected neighbours' distances computed directly."""
        sim = q @ self.bank.T
        if bank_sq is not None:
            sim -= 0.5 * bank_sq
        nearest = sim.topk(self.k, dim=1).indices
        return (self.bank[nearest] - q[:, None, :]).norm(dim=2).max(1).values
