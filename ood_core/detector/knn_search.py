"""The exact k-nearest-neighbour search kernels of :class:`~ood_core.detector.knn.KNN`.

Exhaustive float32 search (:func:`exact_kth_distance`: one GEMM per query block, ``topk``, then the selected
neighbours' distances computed directly, :func:`exact_distances`) and, for unit vectors, the bfloat16 pre-selection
with a rigorous rounding bound (:func:`preselected_kth_distance`, with :func:`chunked_topk`,
:func:`bank_rounding_stats`, :func:`similarity_slack`, :func:`similarity_interval`, :func:`band_limits` and
:func:`rerank`) that returns the same scores. :func:`bf16_matmul_is_fast` gates the pre-selection by device.
:mod:`ood_core.detector.knn` re-exports every name; :class:`~ood_core.detector.knn.KNN` passes its module's
``PRESELECT_FACTORS`` and ``MAX_BLOCK_ELEMENTS`` explicitly, so tuning those on :mod:`ood_core.detector.knn` applies.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import Tensor

#: most elements of one ``queries x bank`` similarity block (64 MiB in float32)
MAX_BLOCK_ELEMENTS = 1 << 24
#: floats of neighbour rows gathered at a time to recompute distances directly (16 MiB)
GATHER_ELEMENTS = 1 << 22
#: candidates kept per query by the pre-selection, as multiples of k (tried in turn; then the exact search)
PRESELECT_FACTORS = (4, 16)
#: columns per strided chunk in :func:`chunked_topk`
TOPK_CHUNK = 16


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


def exact_kth_distance(q: Tensor, bank: Tensor, k: int, bank_sq: Tensor | None, buf: Tensor | None = None) -> Tensor:
    """Exact k-th nearest distances for a block of queries: top-k by similarity over the whole bank (one float32
    GEMM, into ``buf`` when given: larger = closer, ``a.b`` for unit vectors, ``a.b - |b|^2 / 2`` in general as
    ``|a|^2`` is constant per row), then the selected neighbours' distances computed directly."""
    sim = q @ bank.T if buf is None else torch.mm(q, bank.T, out=buf[: q.shape[0]])
    if bank_sq is not None:
        sim -= 0.5 * bank_sq
    return exact_distances(q, bank, sim.topk(k, dim=1).indices)


def preselected_kth_distance(
    z: Tensor,
    bank: Tensor,
    k: int,
    low: tuple[Tensor, Tensor],
    factors: tuple[int, ...] = PRESELECT_FACTORS,
    max_block: int = MAX_BLOCK_ELEMENTS,
) -> Tensor:
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
    up to float32 rounding. The top ``f·k`` entries of ``A`` (``f`` in ``factors``) are kept when
    the last kept one is excluded (the rest is then excluded too); other queries fall back to
    :func:`exact_kth_distance`. The GEMM output and the gathered rows live in buffers reused across blocks
    (fresh 64 MiB allocations are page-faulted at every block), and GEMM row counts are multiples of 16
    (oneDNN runs odd ones ~1.4x slower).

    :param factors: the pre-selection sizes tried in turn, as multiples of ``k`` (``PRESELECT_FACTORS``)
    :param max_block: most similarities per query block, as float32 elements (``MAX_BLOCK_ELEMENTS``)
    """
    bank_low, stats = low
    n, dim = bank.shape
    rows = 2 * max_block // n  # bfloat16: the same bytes as max_block floats
    rows = rows // 64 * 64 if rows >= 64 else max(1, rows)
    height = min(rows, -(-z.shape[0] // 16) * 16)
    approx_buf = z.new_empty(height, n, dtype=torch.bfloat16)
    q_buf = z.new_zeros(height, dim, dtype=torch.bfloat16)
    widest = min(n, max(factors) * k) * dim
    gather_buf = z.new_empty(max(widest, min(max_block, z.shape[0] * widest)))
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
        for factor in factors:
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
        for part in todo.split(max(1, min(max_block // n, max_block // (k * dim)))):
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
