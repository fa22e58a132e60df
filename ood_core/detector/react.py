"""ReAct: rectified activations.

Sun, Guo, Li: "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor

from ood_core.api import TensorSpec, known_mask
from ood_core.detector.ash import ActivationShapingDetector, check_percentile

#: bins of each level of :class:`RadixQuantile` (the high and the low 16 bits of a float32's order key)
RADIX_BINS = 1 << 16
#: the default ``percentile`` of a fitted threshold (the paper's 90th percentile)
DEFAULT_PERCENTILE = 0.9
#: the default fixed ``threshold`` (pytorch-ood's seed documentation)
DEFAULT_THRESHOLD = 1.0


def order_keys(x: Tensor) -> Tensor:
    """int32 keys of float32 values whose integer order is the values' order (sign-magnitude bits turned
    into two's complement: negative values get their magnitude bits flipped)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_value(high: int, low: int) -> float:
    """The float32 value whose :func:`order_keys` key has these high and low 16 bits."""
    key = torch.tensor([((high - RADIX_BINS // 2) << 16) | low], dtype=torch.int64).to(torch.int32)
    return float((key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32))


class RadixQuantile:
    r"""Exact quantile of a stream of float32 values in two passes, with constant memory and mergeable state.

    Pass 0 counts the values per bin of the high 16 bits of their order key (:func:`order_keys`, 65,536
    bins); :meth:`targets` then knows which bin holds each order statistic :math:`x_{(r)}` that the quantile
    needs (ranks :math:`\lfloor q(N-1) \rfloor` and :math:`\lceil q(N-1) \rceil`) and how many values lie
    below it. Pass 1 counts, for those (at most two) bins, the values per low 16 bits: together the two
    levels give the exact 32-bit value of each order statistic, interpolated linearly as
    ``numpy.percentile``'s default. Both passes' histograms are ``int64`` counts: shards merge by addition,
    exactly. Memory: two or three histograms of 65,536 counts (512 KiB each), whatever the stream's length.
    """

    def __init__(self, q: float) -> None:
        self.q = check_percentile(q, "q")

    @staticmethod
    def high_histogram(values: Tensor) -> Tensor:
        """Pass 0: counts per high 16 bits of the values' keys."""
        high = (order_keys(values.reshape(-1)) >> 16) + RADIX_BINS // 2
        return torch.bincount(high.long(), minlength=RADIX_BINS)

    def targets(self, high_hist: Tensor) -> tuple[list[int], list[int], list[int], float]:
        """From pass 0: per needed order statistic its high bin, its rank and the count of values in lower
        bins; and the interpolation weight ``q(N-1) - floor(q(N-1))``."""
        high_hist = high_hist.cpu()
        total = int(high_hist.sum())
        if total == 0:
            raise ValueError("no values to take a quantile of")
        pos = self.q * (total - 1)
        ranks = [math.floor(pos), math.ceil(pos)]
        cum = torch.cumsum(high_hist, 0)
        bins = [int(torch.searchsorted(cum, torch.tensor(r), right=True)) for r in ranks]
        below = [int(cum[b] - high_hist[b]) for b in bins]
        return bins, ranks, below, pos - ranks[0]

    @staticmethod
    def low_histogram(values: Tensor, bins: list[int]) -> Tensor:
        """Pass 1: per target bin, the counts per low 16 bits of the values in it (``len(bins) x 65536``)."""
        keys = order_keys(values.reshape(-1))
        high, low = (keys >> 16) + RADIX_BINS // 2, (keys & 0xFFFF).long()
        return torch.stack([torch.bincount(low[high == b], minlength=RADIX_BINS) for b in bins])

    def quantile(self, high_hist: Tensor, low_hist: Tensor) -> float:
        """The exact quantile from both passes' histograms; ``ValueError`` if pass 1 saw other data."""
        high_hist = high_hist.cpu()
        bins, ranks, below, weight = self.targets(high_hist)
        values = []
        for i, (b, r, n_below) in enumerate(zip(bins, ranks, below, strict=True)):
            row = low_hist[i].cpu()
            if int(row.sum()) != int(high_hist[b]):
                raise ValueError("the data of the second pass differs from the first pass's")
            low = int(torch.searchsorted(torch.cumsum(row, 0), torch.tensor(r - n_below), right=True))
            values.append(key_value(b, low))
        return values[0] + weight * (values[1] - values[0])


class ReAct(ActivationShapingDetector):
    r"""Clip the activations at a threshold :math:`c`, :math:`\bar h = \min(h, c)`, then score the head's
    logits (energy by default). The paper applies ReAct to the penultimate layer and sets :math:`c` to
    the 90th percentile of the ID activations.

    Arguments in the seed's order and defaults: ``ReAct(backbone, head, threshold=1.0, detector=None)``
    uses the fixed threshold and needs no fit (``fit`` does nothing). ``threshold=None``, or the keyword
    ``percentile``, fits :math:`c` instead: the ``percentile`` (default 0.9) of all activations of the ID fit
    samples (label >= 0), exact (for the activations rounded to float32) from two passes over the data with
    :class:`RadixQuantile` (constant memory; the statistics are histograms that merge exactly across shards).

    :param threshold: fixed clipping threshold, or ``None`` to fit it
    :param detector: maps logits to scores (callable or registered name; default ``EnergyBased.score``)
    :param percentile: keyword only: fraction in [0, 1] for a fitted threshold; giving it fits the threshold
        (``threshold`` must then be ``None`` or its default)
    """

    requires_fit = True
    state_spec = {"threshold": TensorSpec(())}

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        threshold: float | None = DEFAULT_THRESHOLD,
        detector: Callable[..., Tensor] | str | None = None,
        *,
        percentile: float | None = None,
    ) -> None:
        super().__init__(backbone, head, detector)
        if percentile is not None and threshold is not None and threshold != DEFAULT_THRESHOLD:
            raise ValueError(f"give ReAct a fixed threshold ({threshold}) or a percentile to fit, not both")
        if percentile is not None:
            threshold = None
        self.percentile = None if threshold is not None else check_percentile(percentile or DEFAULT_PERCENTILE)
        self.fixed_threshold = None if threshold is None else float(threshold)
        if self.fixed_threshold is not None:
            if not math.isfinite(self.fixed_threshold):
                raise ValueError(f"threshold must be finite, got {threshold!r}")
            self.threshold = torch.tensor(self.fixed_threshold, dtype=torch.float32)
            self._mark_fitted()

    def hparams(self) -> dict[str, Any]:
        return {"threshold": self.fixed_threshold, "percentile": self.percentile, **self._score_hparams()}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        hparams = dict(hparams)
        if hparams.get("threshold") is not None:  # states saved before the seed's order kept a percentile
            hparams.pop("percentile", None)
        return super().from_state(hparams, tensors, modules)

    @staticmethod
    def rectify(x: Tensor, threshold: float | Tensor) -> Tensor:
        """``min(x, threshold)`` elementwise."""
        limit = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
        return torch.minimum(x, limit)

    def shape(self, activations: Tensor) -> Tensor:
        return ReAct.rectify(activations, self.threshold)

    # ------------------------------------------------------------------ fitting the threshold: two passes
    @property
    def fit_passes(self) -> int:
        """0 with a fixed threshold; 2 to fit it (the exact percentile of :class:`RadixQuantile`)."""
        return 0 if self.fixed_threshold is not None else 2

    def _begin_fit(self) -> None:
        if self.fit_pass == 0:
            self._high: Tensor | None = None  # pass 0 histogram, kept for pass 1 (the fit context)
        self._hist: Tensor | None = None
        self._fit_device = torch.device("cpu")

    def _quantile(self) -> RadixQuantile:
        assert self.percentile is not None
        return RadixQuantile(self.percentile)

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"ReAct fit expects one label per sample, got {tuple(y.shape)} for {tuple(z.shape)}")
        values = z.detach()[known_mask(y).to(z.device)]
        if not bool(torch.isfinite(values).all()):
            raise ValueError("ReAct: the activations contain NaN or Inf")
        self._fit_device = z.device
        if self.fit_pass == 0:
            hist = RadixQuantile.high_histogram(values)
        else:
            hist = RadixQuantile.low_histogram(values, self._target_bins())
        self._hist = hist if self._hist is None else self._hist + hist.to(self._hist.device)

    def _target_bins(self) -> list[int]:
        """The high bins of the order statistics the percentile needs (from pass 0; computed once)."""
        assert self._high is not None
        if getattr(self, "_bins_of", None) is not self._high:
            self._bins, self._bins_of = self._quantile().targets(self._high)[0], self._high
        return self._bins

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``histogram``: int64 counts, ``65536`` per high 16 bits (pass 0), ``2 x 65536`` per low 16 bits of
        the target bins (pass 1); shards merge by addition."""
        return {} if self._hist is None else {"histogram": self._hist}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        shape = (RADIX_BINS,) if self.fit_pass == 0 else (2, RADIX_BINS)
        hist = stats.get("histogram")
        if set(stats) != {"histogram"} or hist is None or hist.dtype != torch.int64 or tuple(hist.shape) != shape:
            raise ValueError(f"ReAct pass {self.fit_pass} statistics must be an int64 'histogram' of shape {shape}")
        if bool((hist < 0).any()):
            raise ValueError("ReAct statistics 'histogram' has negative counts")
        device = self._hist.device if self._hist is not None else self.device
        self._hist = hist.to(device, copy=True) if self._hist is None else self._hist + hist.to(device)

    def _fit_context(self) -> dict[str, Tensor]:
        return {} if self.fit_pass == 0 or self._high is None else {"high_histogram": self._high}

    def _load_fit_context(self, tensors: dict[str, Tensor]) -> None:
        if self.fit_pass == 0:
            if tensors:
                raise ValueError(f"ReAct pass 0 has no fit context, got {sorted(tensors)}")
            return
        hist = tensors.get("high_histogram")
        if set(tensors) != {"high_histogram"} or hist is None:
            raise ValueError("ReAct pass 1 needs exactly the context 'high_histogram'")
        if hist.dtype != torch.int64 or tuple(hist.shape) != (RADIX_BINS,) or bool((hist < 0).any()):
            raise ValueError(f"ReAct context 'high_histogram' must hold {RADIX_BINS} int64 counts >= 0")
        if int(hist.sum()) == 0:
            raise ValueError("ReAct context 'high_histogram' is empty")
        self._high = hist

    def _finish_fit(self) -> None:
        if self._hist is None or int(self._hist.sum()) == 0:
            raise ValueError("ReAct: no ID activations to fit the threshold on")
        if self.fit_pass == 0:
            self._high = self._hist
            return
        assert self._high is not None
        value = self._quantile().quantile(self._high, self._hist)
        self.threshold = torch.tensor(value, dtype=torch.float32, device=self._fit_device)
        self._high = None
