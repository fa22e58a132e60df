"""Calibration of outlier scores on held-out in-distribution data.

From ID scores that were *not* used to fit the detector, :class:`Calibration` gives

* the threshold at a target ID true-positive rate: the smallest ``t`` with ``#{s_i <= t} / n >= tpr``, so
  that a fraction ``tpr`` of ID inputs is accepted (``is_ood = score > t``);
* conformal p-values (Vovk et al., 2005; Bates et al., "Testing for outliers with conformal p-values",
  2023): ``p(s) = (1 + #{s_i >= s}) / (n + 1)``, valid under exchangeability of test and calibration scores.

It stays compact: up to ``max_exact`` scores are kept sorted and exact; above that, a quantile sketch of
``m = max_exact`` evenly spaced order statistics (with ``n``) is kept, and counts are interpolated linearly
between them. Neighbouring sketch points are :math:`(n - 1) / (m - 1)` order statistics apart, so an
interpolated count (hence :math:`(n + 1)` times a p-value) is off by at most about :math:`n / (m - 1) + 1`
ranks, and the accepted share at :meth:`Calibration.threshold` by about :math:`1 / (m - 1) + 1 / n`.
"""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from ood_core.errors import InvalidStateError

DEFAULT_TPR = 0.95
MAX_EXACT = 10_000
#: largest number of calibration scores (2**53: counts stay exact in float64)
MAX_N = 2**53


class Calibration:
    """Sorted ID calibration scores (or a quantile sketch of them) with threshold and p-value queries."""

    #: names of the tensors :meth:`to_tensors` writes into a saved state
    TENSORS: tuple[str, ...] = ("calibration.quantiles",)

    def __init__(self, scores: Tensor, n: int | None = None, target_tpr: float = DEFAULT_TPR) -> None:
        scores = scores.detach().reshape(-1).to("cpu", torch.float64)
        if scores.numel() == 0:
            raise InvalidStateError("calibration needs at least one score")
        if not torch.isfinite(scores).all():
            raise InvalidStateError("calibration scores contain NaN or Inf")
        if not 0.0 < target_tpr <= 1.0:
            raise ValueError(f"target_tpr must be in (0, 1], got {target_tpr}")
        self.quantiles = torch.sort(scores).values
        self.n = int(n if n is not None else scores.numel())
        if self.n < self.quantiles.numel():
            raise InvalidStateError("calibration n is smaller than the number of stored scores")
        self.target_tpr = float(target_tpr)

    @classmethod
    def from_scores(cls, scores: Tensor, target_tpr: float = DEFAULT_TPR, max_exact: int = MAX_EXACT) -> Calibration:
        """Calibrate on held-out ID scores (any shape; flattened). Keeps a sketch above ``max_exact``."""
        flat = scores.detach().reshape(-1).to("cpu", torch.float64)
        n = flat.numel()
        if n > max_exact:
            levels = torch.linspace(0.0, 1.0, max_exact, dtype=torch.float64)
            flat = torch.quantile(torch.sort(flat).values, levels, interpolation="linear")
        return cls(flat, n=n, target_tpr=target_tpr)

    @property
    def is_exact(self) -> bool:
        return self.quantiles.numel() == self.n

    def _count_below_or_equal(self, s: Tensor) -> Tensor:
        """#{s_i <= s}, exact or interpolated from the sketch."""
        q = self.quantiles
        s = s.to(torch.float64)
        if self.is_exact:
            return torch.searchsorted(q, s, right=True).to(torch.float64)
        m = q.numel()
        # position of s in the sketch, as a fraction of the order statistics, linearly interpolated
        hi = torch.searchsorted(q, s, right=True).clamp(1, m - 1)
        lo = hi - 1
        span = (q[hi] - q[lo]).clamp_min(1e-300)
        frac = ((s - q[lo]) / span).clamp(0.0, 1.0)
        pos = (lo.to(torch.float64) + frac) / (m - 1)
        pos = torch.where(s < q[0], torch.zeros_like(pos), pos)
        pos = torch.where(s >= q[-1], torch.ones_like(pos), pos)
        return pos * self.n

    def p_values(self, scores: Tensor) -> Tensor:
        """Conformal p-values ``(1 + #{s_i >= s}) / (n + 1)`` (float64, on the CPU, same shape)."""
        s = scores.detach().to("cpu", torch.float64)
        flat = s.reshape(-1)
        if self.is_exact:
            greater_equal = self.n - torch.searchsorted(self.quantiles, flat, right=False).to(torch.float64)
        else:
            # sketch: #{s_i >= s} ~ n - #{s_i <= s}; the calibration scores tied at s are not told apart, an
            # error within the sketch's rank bound (module docstring) for scores that are rarely tied
            greater_equal = self.n - self._count_below_or_equal(flat)
        return ((1.0 + greater_equal) / (self.n + 1.0)).reshape(s.shape)

    def threshold(self, tpr: float | None = None) -> float:
        """Smallest score ``t`` with ``#{s_i <= t} / n >= tpr`` (default: the target TPR)."""
        tpr = self.target_tpr if tpr is None else float(tpr)
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        if self.is_exact:
            k = max(int(torch.ceil(torch.tensor(tpr * self.n - 1e-9)).item()), 1)
            return float(self.quantiles[k - 1])
        return float(torch.quantile(self.quantiles, tpr, interpolation="linear"))

    # ------------------------------------------------------------------ serialization
    def to_tensors(self) -> dict[str, Tensor]:
        return {"calibration.quantiles": self.quantiles.contiguous()}

    def to_metadata(self) -> str:
        return json.dumps({"n": self.n, "target_tpr": self.target_tpr}, sort_keys=True)

    @classmethod
    def from_saved(cls, tensors: dict[str, Tensor], metadata: str) -> Calibration:
        """Rebuild from :meth:`to_tensors` / :meth:`to_metadata` output; :class:`InvalidStateError` if malformed:
        ``n`` must be a positive integer, ``target_tpr`` a finite number in (0, 1], the quantiles a non-empty,
        finite, sorted 1-D float64 tensor."""
        try:
            meta = json.loads(metadata)
        except (TypeError, ValueError, RecursionError):
            raise InvalidStateError("calibration metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise InvalidStateError("calibration metadata must be a JSON object")
        n, tpr = meta.get("n"), meta.get("target_tpr")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise InvalidStateError(f"calibration metadata 'n' must be an integer from 1 to {MAX_N}")
        if not isinstance(tpr, (int, float)) or isinstance(tpr, bool) or not math.isfinite(tpr):
            raise InvalidStateError("calibration metadata 'target_tpr' must be a finite number")
        q = tensors.get("calibration.quantiles")
        if q is None:
            raise InvalidStateError("calibration metadata present but tensor 'calibration.quantiles' missing")
        if q.dtype != torch.float64 or q.dim() != 1:
            raise InvalidStateError("calibration.quantiles must be a 1-D float64 tensor")
        if q.numel() == 0:
            raise InvalidStateError("calibration.quantiles is empty: calibration needs at least one score")
        if not bool(torch.isfinite(q).all()):
            raise InvalidStateError("calibration.quantiles contains NaN or Inf")
        if not bool((q[1:] >= q[:-1]).all()):
            raise InvalidStateError("calibration.quantiles must be sorted")
        try:
            return cls(q, n=n, target_tpr=float(tpr))
        except ValueError as exc:
            raise InvalidStateError(f"calibration metadata is malformed: {exc}") from None

    def __repr__(self) -> str:
        kind = "exact" if self.is_exact else f"sketch of {self.quantiles.numel()}"
        return f"Calibration(n={self.n}, {kind}, target_tpr={self.target_tpr})"
