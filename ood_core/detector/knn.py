"""Deep nearest neighbours.

Sun, Ming, Zhu, Li: "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.

The detector, its pytorch-ood / scikit-learn argument handling and its state live here; the search kernels (exact
float32 search, bfloat16 pre-selection) live in :mod:`ood_core.detector.knn_search` and are re-exported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask, model_or_encoder

# the search kernels and their tuning constants, re-exported (``X as X``); KNN reads the constants from this module
from ood_core.detector.knn_search import GATHER_ELEMENTS as GATHER_ELEMENTS
from ood_core.detector.knn_search import MAX_BLOCK_ELEMENTS as MAX_BLOCK_ELEMENTS
from ood_core.detector.knn_search import PRESELECT_FACTORS as PRESELECT_FACTORS
from ood_core.detector.knn_search import TOPK_CHUNK as TOPK_CHUNK
from ood_core.detector.knn_search import band_limits as band_limits
from ood_core.detector.knn_search import bank_rounding_stats as bank_rounding_stats
from ood_core.detector.knn_search import bf16_matmul_is_fast as bf16_matmul_is_fast
from ood_core.detector.knn_search import chunked_topk as chunked_topk
from ood_core.detector.knn_search import exact_distances as exact_distances
from ood_core.detector.knn_search import exact_kth_distance as exact_kth_distance
from ood_core.detector.knn_search import preselected_kth_distance as preselected_kth_distance
from ood_core.detector.knn_search import rerank as rerank
from ood_core.detector.knn_search import similarity_interval as similarity_interval
from ood_core.detector.knn_search import similarity_slack as similarity_slack

#: smallest bank searched with the bfloat16 pre-selection (below it the exact float32 search is as fast)
PRESELECT_MIN_BANK = 10_000
#: slack on the unit norm of bank rows (``normalize=True``) accepted by :meth:`KNN.check_state` (float32 rounding)
NORM_TOLERANCE = 1e-3

#: scikit-learn ``NearestNeighbors`` keywords that do not change an exact Euclidean k-NN search
IGNORED_SKLEARN_KEYWORDS = frozenset({"algorithm", "leaf_size", "n_jobs", "radius"})
#: ``metric`` values that are the Euclidean distance (``minkowski`` with ``p=2``, scikit-learn's default)
EUCLIDEAN_METRICS = frozenset({"minkowski", "euclidean", "l2"})


def sklearn_neighbours(k: int, knn_kwargs: dict[str, Any]) -> int:
    """``k`` from the detector's ``k`` and pytorch-ood's scikit-learn ``**knn_kwargs``.

    ``n_neighbors`` gives the neighbour's rank (``KNN(model, n_neighbors=1)``: the nearest neighbour, the seed's
    score); with ``k`` also set to another value than the default 50 the two must agree. ``metric`` (and
    ``p``, ``metric_params``) must describe the Euclidean distance; the search options in
    :data:`IGNORED_SKLEARN_KEYWORDS` are accepted and ignored. Unknown keywords raise ``TypeError`` as a
    function call would; invalid values ``ValueError``."""
    kwargs = dict(knn_kwargs)
    n_neighbors = kwargs.pop("n_neighbors", None)
    metric = kwargs.pop("metric", "minkowski")
    power = kwargs.pop("p", 2)
    metric_params = kwargs.pop("metric_params", None)
    unknown = sorted(set(kwargs) - IGNORED_SKLEARN_KEYWORDS)
    if unknown:
        raise TypeError(f"KNN() got an unexpected keyword argument '{unknown[0]}'")
    if metric not in EUCLIDEAN_METRICS or (metric == "minkowski" and power != 2) or metric_params:
        raise ValueError(f"KNN searches by Euclidean distance only, got metric={metric!r}, p={power!r}")
    if n_neighbors is not None:
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int):
            raise TypeError(f"n_neighbors must be an int, got {n_neighbors!r}")
        if k not in (50, n_neighbors):
            raise TypeError(f"KNN got k={k} and n_neighbors={n_neighbors}: give one of them")
        k = n_neighbors
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def l2_normalize(z: Tensor) -> Tensor:
    """``z / ||z||`` per row; zero rows stay zero (the norm is clamped at 1e-12)."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


class KNN(Detector):
    r"""Outlier score = Euclidean distance to the :math:`k`-th nearest ID feature:

    .. math:: s(x) = \lVert z - z_{(k)} \rVert_2, \qquad z = \frac{f(x)}{\lVert f(x) \rVert_2}

    where :math:`z_{(k)}` is the :math:`k`-th closest of the (normalized) ID features kept at fit time (Sun et
    al. 2022; with ``normalize=False`` the raw features are used). The bank of ID features is the state.
    This follows the paper, as the issue asks: pytorch-ood's ``KNN`` documents the distance to the nearest
    neighbour (scikit-learn ``NearestNeighbors`` with ``**knn_kwargs``); here ``k`` is the neighbour's rank and
    ``k=1`` gives that nearest-neighbour score.

    The search is exhaustive (exact) and needs no scikit-learn: queries are processed in blocks of at most
    ``MAX_BLOCK_ELEMENTS`` similarities against the whole bank, each block one float32 GEMM
    (:math:`\lVert a-b\rVert^2 = \lVert a\rVert^2 + \lVert b\rVert^2 - 2 a\cdot b`) followed by ``topk``; the
    :math:`k` selected neighbours' distances are then recomputed directly as :math:`\lVert z - b\rVert`, so the
    score carries no cancellation error. With ``normalize=True`` and a bank of at least ``PRESELECT_MIN_BANK``
    rows, the float32 GEMM is replaced by a bfloat16 one whose rounding error is bounded rigorously, followed
    by the exact float32 distances of the few candidates that the bound cannot exclude
    (:func:`preselected_kth_distance`): same scores, about 3x faster than scikit-learn's brute force on a CPU
    with bfloat16 dot products (``docs/benchmark-detectors.md``). A bfloat16 copy of the bank is cached (not
    part of the state). Memory: ``O(N·D)`` for the bank (and its bfloat16 copy) plus two buffers of
    ``MAX_BLOCK_ELEMENTS`` floats (the bfloat16 similarities, the gathered candidates). Labels < 0 are ignored
    when fitting.

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param k: rank of the neighbour whose distance is the score (the paper: 50 for CIFAR-10)
    :param normalize: L2-normalize ID and test features first (as in the paper)
    :param encoder: pytorch-ood 0.4's name for ``model`` (give one of them)
    :param knn_kwargs: the keywords of scikit-learn's ``NearestNeighbors`` that pytorch-ood passes on
        (:func:`sklearn_neighbours`): ``n_neighbors`` sets ``k``; the exact Euclidean search here makes
        ``algorithm``, ``leaf_size``, ``n_jobs`` and ``radius`` irrelevant (accepted, ignored); ``metric`` must
        be Euclidean. Any other keyword raises ``TypeError``.
    """

    state_spec = {"bank": TensorSpec(("N", "D"), torch.float32)}
    requires_fit = True
    input_kind = "features"

    def __init__(
        self, model: Any = None, k: int = 50, normalize: bool = True, *, encoder: Any = None, **knn_kwargs: Any
    ) -> None:
        super().__init__()
        self.model = model_or_encoder(model, encoder, "KNN")
        self.k = sklearn_neighbours(k, knn_kwargs)
        self.normalize = bool(normalize)
        self._bf16_cache: tuple[Tensor, int, Tensor, Tensor] | None = None

    def hparams(self) -> dict[str, Any]:
        return {"k": self.k, "normalize": self.normalize}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> KNN:
        detector = cls(**modules, **hparams)
        if "bank" in tensors and tensors["bank"].shape[0] < detector.k:
            raise ValueError(f"bank has {tensors['bank'].shape[0]} features, fewer than k={detector.k}")
        return detector

    @property
    def feature_dim(self) -> int | None:
        return int(self.bank.shape[1]) if self.is_fitted else None

    def check_state(self) -> None:
        """A finite bank of at least ``k`` features; with ``normalize``, rows of norm at most 1 (unit vectors,
        or the shorter rows :func:`l2_normalize` leaves of near-zero features)."""
        super().check_state()
        rows = int(self.bank.shape[0])
        if rows == 0 or rows < self.k:
            raise InvalidStateError(f"KNN bank has {rows} features: it needs at least k={self.k}")
        if self.normalize and rows:
            longest = float(torch.linalg.vector_norm(self.bank, dim=1).max())
            if longest > 1.0 + NORM_TOLERANCE:
                raise InvalidStateError(
                    f"KNN bank rows must be unit vectors with normalize=True, one has norm {longest:.4g}"
                )

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

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``bank``: the (normalized) ID features seen so far; shards merge by concatenation, in order."""
        if not self._parts:
            return {}
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts)]
        return {"bank": self._parts[0]}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        if set(stats) != {"bank"}:
            raise ValueError(f"KNN statistics must be 'bank', got {sorted(stats)}")
        bank = stats["bank"]
        width = self._parts[0].shape[1] if self._parts else bank.shape[1]
        if bank.dim() != 2 or bank.shape[1] != width or bank.dtype != torch.float32:
            raise ValueError(f"KNN statistics 'bank' must be float32 N x {width}, got {bank.dtype} {tuple(bank.shape)}")
        device = self._parts[0].device if self._parts else self.device
        self._parts.append(bank.to(device, copy=True))

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
        preselect = self.normalize and bank.shape[0] >= max(PRESELECT_MIN_BANK, 4 * self.k)
        if preselect and bf16_matmul_is_fast(bank.device.type):
            low = self._bank_bf16()
            return preselected_kth_distance(z, bank, self.k, low, PRESELECT_FACTORS, MAX_BLOCK_ELEMENTS).to(out_dtype)
        bank_sq = None if self.normalize else torch.linalg.vector_norm(bank, dim=1).square()  # no N x D temporary
        rows = max(1, min(MAX_BLOCK_ELEMENTS // bank.shape[0], MAX_BLOCK_ELEMENTS // (self.k * bank.shape[1])))
        buf = z.new_empty(min(rows, z.shape[0]), bank.shape[0])  # reused: fresh blocks are page-faulted each time
        scores = [exact_kth_distance(q, bank, self.k, bank_sq, buf) for q in z.split(rows)]
        return torch.cat(scores).to(out_dtype) if scores else z.new_zeros(0, dtype=out_dtype)

    def _bank_bf16(self) -> tuple[Tensor, Tensor]:
        """The bank rounded to bfloat16 and its :func:`bank_rounding_stats` (cached, keyed on the bank tensor
        itself and its in-place version counter)."""
        bank, cache = self.bank, self._bf16_cache
        if cache is None or cache[0] is not bank or cache[1] != bank._version:
            low = bank.to(torch.bfloat16)
            cache = self._bf16_cache = (bank, bank._version, low, bank_rounding_stats(bank, low))
        return cache[2], cache[3]
