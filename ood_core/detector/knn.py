"""Deep nearest neighbours.

Sun, Ming, Zhu, Li: "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask, model_or_encoder

#: most elements of one ``queries x bank`` similarity block (64 MiB in float32)
MAX_BLOCK_ELEMENTS = 1 << 24
#: floats of neighbour rows gathered at a time to recompute distances directly (16 MiB)
GATHER_ELEMENTS = 1 << 22
#: smallest bank searched with the bfloat16 pre-selection (below it the exact float32 search is as fast)
PRESELECT_MIN_BANK = 10_000
#: candidates kept per query by the pre-selection, as multiples of k (tried in turn; then the exact search)
PRESELECT_FACTORS = (4, 16)
#: columns per strided chunk in :func:`chunked_topk`
TOPK_CHUNK = 16
#: slack on the unit norm of bank rows (``normalize=True``) accepted by :meth:`KNN.check_state` (float32 rounding)
NORM_TOLERANCE = 1e-3


@cache
def bf16_matmul_is_fast(device_type: str) -> bool:
    """Whether a bfloat16 GEMM beats float32 on this device: on CUDA, and on CPUs with bfloat16 dot-product
    instructions (AVX512-BF16 or AMX). Elsewhere bfloat16 is emulated, slower than float32, and KNN keeps the
    exact float32 search."""
    if device_type == "cuda":
        return True
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


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
            return preselected_kth_distance(z, bank, self.k, self._bank_bf16()).to(out_dtype)
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


def exact_kth_distance(q: Tensor, bank: Tensor, k: int, bank_sq: Tensor | None, buf: Tensor | None = None) -> Tensor:
    """Exact k-th nearest distances for a block of queries: top-k by similarity over the whole bank (one float32
    GEMM, into ``buf`` when given: larger = closer, ``a.b`` for unit vectors, ``a.b - |b|^2 / 2`` in general as
    ``|a|^2`` is constant per row), then the selected neighbours' distances computed directly."""
    sim = q @ bank.T if buf is None else torch.mm(q, bank.T, out=buf[: q.shape[0]])
    if bank_sq is not None:
        sim -= 0.5 * bank_sq
    return exact_distances(q, bank, sim.topk(k, dim=1).indices)


def preselected_kth_distance(z: Tensor, bank: Tensor, k: int, low: tuple[Tensor, Tensor]) -> Tensor:
    r"""Exact k-th nearest distances of unit queries ``z`` to a unit ``bank``, with a bfloat16 pre-selection.

    Per block of queries, :math:`A = \mathrm{bf16}(\hat q \hat b^\top)` is one bfloat16 GEMM (``\hat{}`` =
    rounded to bfloat16; float32 accumulation; output rounded to nearest), 2-4x faster than float32 on CPUs
    with bfloat16 dot products. Rank by the key :math:`t = q\cdot b - (\lVert b\rVert^2 - 1)/2`, as
    :math:`\lVert q-b\rVert^2 = \lVert q\rVert^2 + 1 - 2t`. For every pair (:func:`similarity_slack`,
    :func:`similarity_interval`): :math:`|t - A| \le e(A) = E_q + \rho(A)`, so :math:`t \in [lo(A), up(A)]`,
    :math:`lo, up = A \mp e(A)`, both strictly increasing over bfloat16 values. :func:`band_limits` then splits
    the entries sorted by :math:`A` (:math:`a_1 \ge a_2 \ge \dots`), with :math:`L = lo(a_k)`,
    :math:`U = up(a_k)` and :math:`t_{(k)}` the k-th largest key of the whole bank:

    * :math:`t_{(k)} \ge L`: the k entries :math:`a_1..a_k` have :math:`t \ge lo(a_i) \ge L`.
    * :math:`t_{(k)} \le U`: a pair with :math:`t > U` has :math:`up(A) > up(a_k)`, so :math:`A > a_k`; fewer
      than k pairs do.
    * excluded, :math:`up(A) < L`: :math:`t < t_{(k)}`; certain, the first ``c`` entries with :math:`lo(A) > U`:
      :math:`t > t_{(k)}`. Removing pairs strictly below :math:`t_{(k)}` keeps it the k-th largest; removing
      ``c`` pairs strictly above makes it the :math:`(k-c)`-th largest.

    So the score is the :math:`(k-c)`-th smallest distance over the band (neither excluded nor certain), all
    computed directly as :math:`\lVert q-b\rVert` in float32 (:func:`rerank`): the exhaustive search's result
    up to float32 rounding. The top ``f·k`` entries of ``A`` (``f`` in ``PRESELECT_FACTORS``) are kept when
    the last kept one is excluded (the rest is then excluded too); other queries fall back to
    :func:`exact_kth_distance`. The GEMM output and the gathered rows live in buffers reused across blocks
    (fresh 64 MiB allocations are page-faulted at every block), and GEMM row counts are multiples of 16
    (oneDNN runs odd ones ~1.4x slower).
    """
    bank_low, stats = low
    n, dim = bank.shape
    rows = 2 * MAX_BLOCK_ELEMENTS // n  # bfloat16: the same bytes as MAX_BLOCK_ELEMENTS floats
    rows = rows // 64 * 64 if rows >= 64 else max(1, rows)
    height = min(rows, -(-z.shape[0] // 16) * 16)
    approx_buf = z.new_empty(height, n, dtype=torch.bfloat16)
    q_buf = z.new_zeros(height, dim, dtype=torch.bfloat16)
    widest = min(n, max(PRESELECT_FACTORS) * k) * dim
    gather_buf = z.new_empty(max(widest, min(MAX_BLOCK_ELEMENTS, z.shape[0] * widest)))
    out = z.new_empty(z.shape[0])
    for start in range(0, z.shape[0], rows):
        q = z[start : start + rows]
        r = q.shape[0]
        m = r if r < 16 else min(height, -(-r // 16) * 16)  # below 16 rows the GEMM reads the bank anyway
        q_buf[:r].copy_(q)
        q_buf[r:m].zero_()
        approx = torch.mm(q_buf[:m], bank_low.T, out=approx_buf[:m])[:r]
        slack = similarity_slack(q, q_buf[:r], stats)
        todo = torch.arange(r, device=q.device)
        for factor in PRESELECT_FACTORS:
            keep = min(n, factor * k)
            values, indices = chunked_topk(approx if todo.numel() == r else approx[todo], keep)
            first, count, complete = band_limits(values, slack[todo], k)
            if keep == n:
                complete.fill_(True)
            done = todo[complete]
            if done.numel():
                out[start + done] = rerank(
                    q[done], bank, indices[complete], first[complete], count[complete], k, gather_buf
                )
            todo = todo[~complete]
            if todo.numel() == 0:
                break
        for part in todo.split(max(1, min(MAX_BLOCK_ELEMENTS // n, MAX_BLOCK_ELEMENTS // (k * dim)))):
            out[start + part] = exact_kth_distance(q[part], bank, k, None)  # float32 blocks within the bound
    return out


def chunked_topk(a: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """``a.topk(keep, dim=1)`` (values in decreasing order, column indices) in two smaller selections, about 1.3x
    faster on ``640 x 50,000``: the maxima of ``G = n // TOPK_CHUNK`` strided chunks (columns ``g, g + G, ...``),
    the ``keep`` chunks with the largest maxima, then ``topk`` over their entries and the ``n mod TOPK_CHUNK``
    tail columns. Exact: an entry outside the chosen chunks is at most their smallest maximum, and their ``keep``
    maxima are entries of the union, so the union holds the row's ``keep`` largest values (ties in any order)."""
    rows, n = a.shape
    groups = n // TOPK_CHUNK
    if groups < keep:
        top = a.topk(keep, dim=1)
        return top.values, top.indices
    span = TOPK_CHUNK * groups
    chunks = a[:, :span].view(rows, TOPK_CHUNK, groups).amax(1).topk(keep, dim=1, sorted=False).indices
    cols = (chunks[:, None, :] + groups * torch.arange(TOPK_CHUNK, device=a.device)[:, None]).reshape(rows, -1)
    if span < n:
        cols = torch.cat([cols, torch.arange(span, n, device=a.device).expand(rows, -1)], 1)
    top = a.gather(1, cols).topk(keep, dim=1)
    return top.values, cols.gather(1, top.indices)


def bank_rounding_stats(bank: Tensor, bank_low: Tensor, rows: int = 16384) -> Tensor:
    """float64 ``[max ||b||, max ||b - bf16(b)||, max ||bf16(b)||, max | ||b||^2 - 1 | / 2]`` over the rows,
    computed ``rows`` at a time (float64 copies of the whole bank would cost 4x its memory)."""
    parts = []
    for start in range(0, max(1, bank.shape[0]), rows):
        b, b_low = bank[start : start + rows].double(), bank_low[start : start + rows].double()
        norm = b.norm(dim=1)
        parts.append(
            torch.stack(
                [
                    norm.max(),
                    (b - b_low).norm(dim=1).max(),
                    b_low.norm(dim=1).max(),
                    (norm.square() - 1).abs().max() / 2,
                ]
            )
        )
    return torch.stack(parts).amax(dim=0)


def similarity_slack(q: Tensor, q_low: Tensor, stats: Tensor) -> Tensor:
    r"""Per query, :math:`E_q = \lVert q-\hat q\rVert \max\lVert b\rVert + \lVert\hat q\rVert
    (\max\lVert b-\hat b\rVert + \gamma_{2D} \max\lVert\hat b\rVert) + \max|\lVert b\rVert^2-1|/2`
    (float64): Cauchy-Schwarz on the input rounding, :math:`\gamma_n = nu/(1-nu)`, :math:`u = 2^{-24}`, for
    the float32 sum, and the shift from :math:`q\cdot b` to the key :math:`t`; with a margin (relative 1e-4,
    absolute 1e-6) for the rounding of the norms and of the bound itself."""
    max_norm, max_err, max_low_norm, norm_dev = stats.tolist()
    gamma = 2 * q.shape[1] * 2.0**-24 / (1 - 2 * q.shape[1] * 2.0**-24)
    q64, low64 = q.double(), q_low.double()
    err = (q64 - low64).norm(dim=1) * max_norm + low64.norm(dim=1) * (max_err + gamma * max_low_norm) + norm_dev
    return err * (1 + 1e-4) + 1e-6


def similarity_interval(values: Tensor, slack: Tensor) -> tuple[Tensor, Tensor]:
    r"""``lo, up = A -+ e(A)`` in float64 for bfloat16 values ``A`` (``B x K``) and per-query slack ``E_q``:
    :math:`e(A) = E_q + \rho(A)`, :math:`\rho(A) = 2^{-8} 2^{\lfloor \log_2 |A| \rfloor}`, the largest distance
    from a real number to its round-to-nearest bfloat16 value ``A`` (8 significant bits; for ``A = 2^e`` the
    spacing above, the larger; :math:`\rho(0) = 2^{-9}` covers flush-to-zero). Both are strictly increasing
    over bfloat16 values (:math:`\rho` changes by at most half the spacing of ``A`` at a power of two)."""
    a = values.double()
    rho = torch.ldexp(torch.ones_like(a), torch.frexp(a).exponent - 9)  # |a| = m 2^e, m in [0.5, 1)
    width = slack[:, None] + rho
    return a - width, a + width


def band_limits(values: Tensor, slack: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """For the top entries of ``A`` sorted in decreasing order (``B x K``, ``K >= k``): ``first`` = the number
    ``c`` of certain entries (``lo(A) > up(a_k)``), ``count`` = the number not excluded (``up(A) >= lo(a_k)``),
    and whether the row is complete (its last entry excluded). See :func:`preselected_kth_distance`."""
    lo, up = similarity_interval(values, slack)
    lower, upper = lo[:, k - 1 : k], up[:, k - 1 : k]
    return (lo > upper).sum(1), (up >= lower).sum(1), up[:, -1] < lower[:, 0]


def rerank(q: Tensor, bank: Tensor, candidates: Tensor, first: Tensor, count: Tensor, k: int, buf: Tensor) -> Tensor:
    """The ``(k - first[i])``-th smallest distance ``||q_i - b||`` over the bank rows ``candidates[i, j]``,
    ``first[i] <= j < count[i]`` (``k - first <= count - first``). The rows are gathered into ``buf`` (groups of
    queries; few large operations); the distances are computed directly (``cdist`` without the matmul
    expansion, so no cancellation) and padded with +inf."""
    width, dim = int((count - first).max()), bank.shape[1]
    pos = first[:, None] + torch.arange(width, device=q.device)
    valid = pos < count[:, None]
    index = candidates.gather(1, pos.clamp_max(candidates.shape[1] - 1))
    rank = k - first
    group = max(1, buf.numel() // (width * dim))
    out = []
    for rows, idx, ok, rk in zip(
        q.split(group), index.split(group), valid.split(group), rank.split(group), strict=True
    ):
        flat = idx.reshape(-1)
        cand = torch.index_select(bank, 0, flat, out=buf[: flat.numel() * dim].view(-1, dim))
        dist = torch.cdist(
            rows[:, None, :], cand.view(rows.shape[0], width, dim), compute_mode="donot_use_mm_for_euclid_dist"
        )
        dist = dist.squeeze(1).masked_fill_(~ok, float("inf"))
        smallest = dist.topk(int(rk.max()), dim=1, largest=False, sorted=True).values
        out.append(smallest.gather(1, (rk - 1)[:, None]).squeeze(1))
    return torch.cat(out)


def exact_distances(q: Tensor, bank: Tensor, nearest: Tensor) -> Tensor:
    """Largest of the directly computed distances ``||q - b||`` to the given neighbours (``B x k`` indices).

    In groups of queries whose gathered neighbours stay around ``GATHER_ELEMENTS`` floats (a few MiB, cache
    sized, one buffer reused): gathering all ``B x k x D`` rows at once and subtracting made two large temporaries
    and took ~7x longer."""
    k, dim = nearest.shape[1], bank.shape[1]
    group = max(1, GATHER_ELEMENTS // (k * dim))
    gathered = bank.new_empty(min(group, q.shape[0]) * k, dim)
    out = []
    for rows, idx in zip(q.split(group), nearest.split(group), strict=True):
        m = rows.shape[0]
        neighbours = torch.index_select(bank, 0, idx.reshape(-1), out=gathered[: m * k]).view(m, k, dim)
        dist = torch.cdist(rows[:, None, :], neighbours, compute_mode="donot_use_mm_for_euclid_dist")
        out.append(dist.squeeze(1).amax(1))
    return torch.cat(out) if out else q.new_zeros(0)
