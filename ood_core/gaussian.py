"""Streaming class-conditional Gaussian statistics, mergeable across shards.

Shared by :mod:`~ood_core.detector.mahalanobis`, :mod:`~ood_core.detector.rmd`,
:mod:`~ood_core.detector.multi_mahalanobis` and :mod:`~ood_core.detector.vim`: fits accumulate sufficient statistics
(counts, sums, scatter) in float64 over a stream of batches, in memory O(D^2 + batch) (:class:`ClassGaussianStats`),
and shards merge with the parallel formula of Chan, Golub and LeVeque (:func:`merge_scatter`). The precision and
distance kernels (``robust_precision``, ``check_precision``, ``min_mahalanobis``, ...) live in
:mod:`ood_core.mahalanobis_kernels` and are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.api import known_mask

# the precision and distance kernels, re-exported (``X as X``: explicit re-exports)
from ood_core.mahalanobis_kernels import MAX_BLOCK_ELEMENTS as MAX_BLOCK_ELEMENTS
from ood_core.mahalanobis_kernels import MAX_CHOLESKY_CONDITION as MAX_CHOLESKY_CONDITION
from ood_core.mahalanobis_kernels import PRECISION_TOLERANCE as PRECISION_TOLERANCE
from ood_core.mahalanobis_kernels import check_precision as check_precision
from ood_core.mahalanobis_kernels import min_mahalanobis as min_mahalanobis
from ood_core.mahalanobis_kernels import nearest_centre as nearest_centre
from ood_core.mahalanobis_kernels import output_dtype as output_dtype
from ood_core.mahalanobis_kernels import pooled_features as pooled_features
from ood_core.mahalanobis_kernels import robust_precision as robust_precision
from ood_core.utils import add_gram, symmetric_from_upper

#: rows shifted and multiplied at a time while fitting (bounds the fit's working memory for a large batch)
CHUNK_ROWS = 4096


class ClassGaussianStats:
    r"""Streaming per-class counts, means and pooled within-class scatter, accumulated in float64.

    Each class ``c`` gets a reference point :math:`r_c` (its mean in the first chunk where it occurs, rounded
    to the working dtype; all references move to the running means whenever the number of samples seen has
    doubled since the last move, i.e. ``O(log N)`` times, see :meth:`_move_references`). Chunks of at most
    ``CHUNK_ROWS`` rows are shifted by their rows' class references, :math:`s_i = z_i - r_{y_i}`, and the sums :math:`\sum s` (per class) and
    :math:`\sum s s^\top` (pooled) are added to float64 accumulators. At the end, with
    :math:`d_c = \frac{1}{n_c}\sum_{y_i=c} s_i`, the class means are :math:`r_c + d_c` and the pooled scatter
    is :math:`\sum_i s_i s_i^\top - \sum_c n_c d_c d_c^\top` (exact algebra; as :math:`r_c` is close to the
    class mean, the shifted values are small and the correction causes no cancellation).

    Working dtype: float64 features are shifted and multiplied in float64 (a float64 GEMM); float32 (or
    lower) features in float32: each chunk's ``sᵀs`` is one float32 GEMM (products and the sum over one
    chunk rounded to float32, relative error about 1e-7 per entry, about the precision of float32
    features) before it is added in float64, and so are the class sums of one chunk (small values: the
    references follow the means). Pass float64 features to keep every digit of an
    ill-conditioned covariance. Peak memory is ``O(C·D + D²)`` plus one chunk, whatever the number of batches.
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None  # (C,) float64
        self.ref: Tensor | None = None  # (C, D) float64, exactly representable in the working dtype
        self.sums: Tensor | None = None  # (C, D) float64, sum of z - ref_y per class
        self.gram: Tensor | None = None  # (D, D) float64, upper triangle of sum (z - ref_y)(z - ref_y)^T
        self.correction: Tensor | None = None  # (D, D) float64, its symmetric part is added to the scatter
        self.moved_at = 0.0  # number of samples when the references were last moved
        self._ref_work: Tensor | None = None  # ref in the working dtype

    def update(self, z: Tensor, y: Tensor) -> None:
        """Fold in features ``z`` (``N x D``) with labels ``y``; labels < 0 (OOD) are ignored."""
        y = y.reshape(-1).to(z.device)
        if z.dim() != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(f"expected N x D features and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
        keep = known_mask(y)
        z, y = (z.detach(), y.long()) if bool(keep.all()) else (z.detach()[keep], y[keep].long())
        if self.gram is None:
            dim = z.shape[1]
            self.counts = torch.zeros(0, dtype=torch.float64, device=z.device)
            self.ref = torch.zeros(0, dim, dtype=torch.float64, device=z.device)
            self.sums = torch.zeros(0, dim, dtype=torch.float64, device=z.device)
            self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=z.device)
            self.correction = torch.zeros(dim, dim, dtype=torch.float64, device=z.device)
        assert self.counts is not None and self.ref is not None and self.sums is not None
        if self.ref.device != z.device:  # statistics merged or resumed on another device: follow the data
            self._to(z.device)
        if z.shape[1] != self.ref.shape[1]:
            raise ValueError(f"feature dimension changed from {self.ref.shape[1]} to {z.shape[1]}")
        if y.numel() == 0:
            return
        self._grow(int(y.max()) + 1)  # new labels: grow with empty classes
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        for rows, labels in zip(z.split(CHUNK_ROWS), y.split(CHUNK_ROWS), strict=True):
            self._merge(rows.to(work), labels)

    def _to(self, device: torch.device) -> None:
        assert self.counts is not None and self.ref is not None and self.sums is not None
        assert self.gram is not None and self.correction is not None
        self.counts, self.ref, self.sums = self.counts.to(device), self.ref.to(device), self.sums.to(device)
        self.gram, self.correction, self._ref_work = self.gram.to(device), self.correction.to(device), None

    def _merge(self, z: Tensor, y: Tensor) -> None:
        """Add one chunk (in the working dtype) to the float64 sums."""
        assert self.counts is not None and self.ref is not None and self.sums is not None
        assert self.gram is not None
        chunk_counts = torch.bincount(y, minlength=self.ref.shape[0]).to(torch.float64)
        new = (self.counts == 0) & (chunk_counts > 0)
        total = float(self.counts.sum())
        if total > 0 and total >= 2 * self.moved_at:  # the data seen has doubled: re-centre every class
            self._move_references(self.counts > 0, z.dtype)
            self.moved_at = total
        if bool(new.any()):  # first rows of these classes: their chunk mean becomes the reference
            rows = new[y]  # (any point near the mean is a good reference: the working dtype is enough)
            sums = torch.zeros(self.ref.shape, dtype=z.dtype, device=z.device).index_add_(0, y[rows], z[rows])
            mean = (sums / chunk_counts.clamp_min(1.0).to(z.dtype)[:, None]).to(torch.float64)
            self.ref = torch.where(new[:, None], mean, self.ref)
            self._ref_work = None
            if self.moved_at == 0:
                self.moved_at = float(chunk_counts.sum())
        if self._ref_work is None or self._ref_work.dtype != z.dtype:
            if bool((self.ref.to(z.dtype).to(torch.float64) != self.ref).any()):  # float64 before, now float32
                self._move_references(self.counts > 0, z.dtype)  # to references that float32 represents
            self._ref_work = self.ref.to(z.dtype)
        shifted = z - self._ref_work.index_select(0, y)
        chunk_sums = torch.zeros(self.sums.shape, dtype=z.dtype, device=z.device).index_add_(0, y, shifted)
        self.sums += chunk_sums
        add_gram(self.gram, shifted)
        self.counts = self.counts + chunk_counts

    def _move_references(self, classes: Tensor, dtype: torch.dtype) -> None:
        r"""Move the references of ``classes`` (a mask) to their current means (rounded to ``dtype``), so that
        the shifted values stay close to zero. Exact float64 update: with :math:`r' = r + \delta` and
        :math:`S = \sum s`, :math:`\sum s' s'^\top = \sum s s^\top - \delta S^\top - S \delta^\top
        + n \delta \delta^\top` (kept, summed over the classes, in ``correction`` as the non-symmetric
        :math:`(n\delta - 2S)^\top \delta`, whose symmetric part it is) and :math:`S' = S - n \delta`."""
        assert self.counts is not None and self.ref is not None and self.sums is not None
        assert self.correction is not None
        n, ref, sums = self.counts[classes], self.ref[classes], self.sums[classes]
        moved = (ref + sums / n[:, None]).to(dtype).to(torch.float64)
        delta = moved - ref
        self.correction += (delta * n[:, None] - 2 * sums).T @ delta
        self.sums[classes] = sums - delta * n[:, None]
        self.ref[classes] = moved
        self._ref_work = None

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts, means, within-class covariance = scatter / N)``; every class ``0..C-1`` must occur."""
        if self.counts is None or self.counts.sum() == 0:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        missing = (self.counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"classes {missing[:10]} have no samples; labels must be 0..C-1 with all classes present")
        counts, means, scatter = self.moments()
        return counts, means, scatter / counts.sum()

    def moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts, means, pooled within-class scatter)`` in float64, not divided by N; classes without
        samples get mean 0 (they add nothing to the scatter)."""
        if self.counts is None or self.ref is None or self.sums is None or self.gram is None:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        assert self.correction is not None
        shift = self.sums / self.counts.clamp_min(1.0)[:, None]
        scatter = symmetric_from_upper(self.gram) + (self.correction + self.correction.T) / 2
        scatter -= (shift * self.counts[:, None]).T @ shift
        means = torch.where((self.counts > 0)[:, None], self.ref + shift, torch.zeros_like(shift))
        return self.counts, means, scatter

    # ------------------------------------------------------------------ mergeable statistics
    def to_tensors(self) -> dict[str, Tensor]:
        """The exact accumulator state (``{}`` before any sample): ``counts``, ``ref``, ``sums``, ``gram``,
        ``correction`` and ``moved_at``. :meth:`merge` of these into empty statistics restores it exactly."""
        if self.counts is None or self.ref is None or self.sums is None or self.gram is None:
            return {}
        assert self.correction is not None
        return {
            "counts": self.counts,
            "ref": self.ref,
            "sums": self.sums,
            "gram": self.gram,
            "correction": self.correction,
            "moved_at": torch.tensor(self.moved_at, dtype=torch.float64),
        }

    def merge(self, tensors: dict[str, Tensor], device: torch.device | None = None) -> None:
        r"""Fold in another shard's :meth:`to_tensors`.

        Into empty statistics this is an exact copy (a resumed fit continues bit for bit). Otherwise each
        side is reduced to per-class counts, means and pooled within-class scatter (:meth:`moments`) and
        combined with the parallel formula of Chan, Golub and LeVeque (1979), per class :math:`c`:

        .. math:: n_c = n_c^a + n_c^b, \quad \delta_c = \bar z_c^b - \bar z_c^a, \quad
            \bar z_c = \bar z_c^a + \frac{n_c^b}{n_c}\delta_c, \quad
            W = W^a + W^b + \sum_c \frac{n_c^a n_c^b}{n_c} \delta_c \delta_c^\top

        (:func:`merge_scatter`), not a plain sum: the two shards' shifted sums are taken about different
        references. The result is stored about this side's references (the other's for classes only it
        has), as shifted sums and scatter, so that more batches can follow."""
        if not tensors:
            return
        other = _checked_tensors(tensors)
        if self.gram is None:
            target = device if device is not None else other["counts"].device
            self.counts, self.ref, self.sums, self.gram, self.correction = (
                other[k].to(target, torch.float64).clone() for k in ("counts", "ref", "sums", "gram", "correction")
            )
            self.moved_at, self._ref_work = float(other["moved_at"]), None
            return
        assert self.ref is not None
        if other["ref"].shape[1] != self.ref.shape[1]:
            raise ValueError(f"feature dimension {other['ref'].shape[1]} differs from {self.ref.shape[1]}")
        theirs = ClassGaussianStats()
        theirs.merge(other, self.ref.device)
        classes = max(self.ref.shape[0], theirs.ref.shape[0])  # type: ignore[union-attr]
        self._grow(classes)
        theirs._grow(classes)
        n_a, mean_a, scatter_a = self.moments()
        n_b, mean_b, scatter_b = theirs.moments()
        counts, means, scatter = merge_scatter(n_a, mean_a, scatter_a, n_b, mean_b, scatter_b)
        assert theirs.ref is not None
        ref = torch.where((n_a > 0)[:, None], self.ref, theirs.ref)
        shift = torch.where((counts > 0)[:, None], means - ref, torch.zeros_like(ref))
        self.counts, self.ref, self.sums = counts, ref, shift * counts[:, None]
        self.gram = scatter + (self.sums.T @ shift)
        self.correction = torch.zeros_like(self.gram)
        self.moved_at, self._ref_work = float(counts.sum()), None

    def _grow(self, classes: int) -> None:
        """Append empty classes up to ``classes``."""
        assert self.counts is not None and self.ref is not None and self.sums is not None
        grow = classes - self.ref.shape[0]
        if grow > 0:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
            self.ref = torch.cat([self.ref, self.ref.new_zeros(grow, self.ref.shape[1])])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow, self.sums.shape[1])])
            self._ref_work = None

    def total_covariance(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of all ID samples (one Gaussian): within plus between-class scatter, / N."""
        counts, means, within = self.finish()
        n = counts.sum()
        mean = (counts[:, None] * means).sum(0) / n
        dev = means - mean
        return mean, within + (dev * (counts / n)[:, None]).T @ dev


#: the entries of :meth:`ClassGaussianStats.to_tensors`, with their number of dimensions
STATS_RANKS = {"counts": 1, "ref": 2, "sums": 2, "gram": 2, "correction": 2, "moved_at": 0}


def _checked_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Validate the entries and shapes of :meth:`ClassGaussianStats.to_tensors` (``ValueError`` otherwise)."""
    if set(tensors) != set(STATS_RANKS):
        raise ValueError(f"Gaussian statistics must hold {sorted(STATS_RANKS)}, got {sorted(tensors)}")
    for name, rank in STATS_RANKS.items():
        t = tensors[name]
        if t.dim() != rank or not t.is_floating_point():
            raise ValueError(f"Gaussian statistics '{name}' must be a floating tensor of {rank} dimensions")
    classes, dim = tensors["ref"].shape
    shapes = {"counts": (classes,), "sums": (classes, dim), "gram": (dim, dim), "correction": (dim, dim)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"Gaussian statistics '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")
    counts = tensors["counts"]
    if bool((counts < 0).any()) or bool((counts != counts.round()).any()):
        raise ValueError("Gaussian statistics 'counts' must be non-negative whole numbers")
    return tensors


def merge_scatter(
    n_a: Tensor, mean_a: Tensor, scatter_a: Tensor, n_b: Tensor, mean_b: Tensor, scatter_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Combine per-class counts (``C``), means (``C x D``) and pooled within-class scatter (``D x D``) of two
    disjoint sets of samples (Chan, Golub, LeVeque 1979, applied per class and pooled):
    :math:`n = n^a + n^b`, :math:`\bar z = \bar z^a + \frac{n^b}{n}(\bar z^b - \bar z^a)` and
    :math:`W = W^a + W^b + \sum_c \frac{n_c^a n_c^b}{n_c} \delta_c\delta_c^\top`, :math:`\delta_c = \bar z_c^b
    - \bar z_c^a`. A class absent on one side (count 0, any finite mean) takes the other side's mean."""
    n = n_a + n_b
    safe = n.clamp_min(1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)[:, None]
    weight = n_a * n_b / safe
    return n, mean, scatter_a + scatter_b + (delta * weight[:, None]).T @ delta
