"""Drift of the served images away from a detector's calibration data, over a sliding window of the last
``window`` scored images per model and detector (``OOD_DRIFT_WINDOW``).

While traffic is exchangeable with the ``n`` ID calibration scores of a detector state, its conformal p-values
``p = (1 + #{calibration >= s}) / (n + 1)`` are uniform (Bates et al., "Testing for outliers with conformal
p-values", Ann. Statist. 2023). Two tests are run on the ``m`` p-values of a window:

* **OOD share.** The verdict at the state's default threshold ``t = c_(k)``, ``k = ceil(tpr * n)`` (the served
  ``score > t``), is ``p <= a / (n + 1)`` with ``a = n - k + 1``: so the window's OOD count ``K`` is read off
  the p-values, whatever threshold the requests asked for. ``t`` is an order statistic of the calibration scores,
  so the probability that an ID image exceeds it is ``Beta(a, k)`` distributed and ``K ~ BetaBinomial(m, a, k)``
  exactly (Vovk, "Conditional validity of inductive conformal predictors", ACML 2012); its mean, the expected
  share, is ``a / (n + 1)``, ``1 - tpr`` up to rounding. The p-value is ``P(K' >= K)`` (an excess of OOD
  verdicts); as ``n -> inf`` it is the exact binomial test at ``1 - tpr`` (``scipy.stats.binomtest``).
* **Kolmogorov-Smirnov.** The window's p-values against the uniform distribution. They share one finite
  calibration set, so the null is that of the two-sample test, window against calibration: ranks
  ``b = (n + 1)(1 - p) = #{calibration < s}`` placed between calibration ranks ``1..n`` go to
  ``scipy.stats.ks_2samp`` (exact for small samples). For a sketched calibration (``n`` over its exact size) the
  statistic is ``scipy.stats.kstest(p, "uniform")``. Large samples use the asymptotic two-sample null at
  ``N = m n / (m + n)``.

The plain one-sample tests ignore the calibration's own sampling error: with ``n = 163`` (the demo) and
``m = 1000`` ID images they reject at 5% in about half (binomial) and 94% (KS) of windows
(``tests/service/engine/test_drift.py`` measures it).

An update (:meth:`DriftMonitor.observe`, the batch worker) copies a batch's p-values into a ring buffer under a
lock: O(batch). The tests run only when a reading is asked for (``/drift``, a ``/metrics`` scrape), at most once
per ``refresh_s`` while new images arrive; a scoring request never pays for them. A window belongs to one state
version: a new upload or fit starts an empty one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ood_core.calibration import Calibration
from service.engine.active import ActiveDetector

EXACT_KS_PAIRS = 1_000_000
"""Window x calibration sizes up to which the KS p-value is exact (a few ms); above, asymptotic (well under one)."""
FINITE_KS_N = 1000
SEGMENTATION_NOTE = "segmentation detectors give per-pixel scores, no per-image conformal p-value to test"
UNCALIBRATED_NOTE = "the detector state has no calibration, so no p-values to test"


@dataclass(frozen=True)
class DriftReading:
    """The two tests on one detector's window (every test field ``None`` while the window is empty)."""

    detector: str
    version: int
    window: int
    filled: int
    calibration_size: int | None
    target_tpr: float | None
    ood_share: float | None
    expected_share: float | None
    share_p_value: float | None
    ks_statistic: float | None
    ks_p_value: float | None
    drifting: bool
    note: str | None = None


def verdict_rank(calibration: Calibration) -> int:
    """``a = n - k + 1``: an image is OOD at the default threshold iff ``(n + 1) p <= a``."""
    n = calibration.n
    k = max(math.ceil(calibration.target_tpr * n - 1e-9), 1)
    return n - k + 1


def share_test(p_values: np.ndarray, calibration: Calibration) -> tuple[float, float, float]:
    """``(ood_share, expected_share, p-value)`` of the OOD verdicts at the default threshold (module docstring)."""
    n, a = calibration.n, verdict_rank(calibration)
    m = int(p_values.size)
    flagged = int(np.count_nonzero(p_values * (n + 1) <= a + 0.5))
    p_value = float(stats.betabinom.sf(flagged - 1, m, a, n + 1 - a))
    return flagged / m, a / (n + 1), min(max(p_value, 0.0), 1.0)


def _two_sample_statistic(below: np.ndarray, n: int) -> float:
    """sup |F_window - F_calibration| with window points at ``b + 0.5`` and calibration points at ``1..n``: on
    ``[j, j + 1)`` the calibration ECDF is ``j / n`` and the window's ``C(j - 1) / m`` then ``C(j) / m``,
    ``C(j) = #{b <= j}``. O(m + n), no sort."""
    m = below.size
    cumulative = np.cumsum(np.bincount(below, minlength=n + 1)[: n + 1]) / m
    reference = np.arange(n + 1) / n
    previous = np.concatenate(([0.0], cumulative[:-1]))
    return float(max(np.abs(cumulative - reference).max(), np.abs(previous - reference).max()))


def _asymptotic_p_value(statistic: float, m: int, n: int) -> float:
    """The two-sample null at ``N = m n / (m + n)``: the finite-N one-sample distribution ``kstwo`` up to
    :data:`FINITE_KS_N`, the Kolmogorov limit ``kstwobign.sf(D sqrt(N))`` above (as fast at any N)."""
    effective = m * n / (m + n)
    if effective <= FINITE_KS_N:
        return float(stats.kstwo.sf(statistic, max(round(effective), 1)))
    return float(stats.kstwobign.sf(statistic * math.sqrt(effective)))


def ks_test(p_values: np.ndarray, calibration: Calibration) -> tuple[float, float]:
    """``(statistic, p-value)`` of the window's p-values against uniform, with the two-sample null: exact
    (``scipy.stats.ks_2samp``) up to :data:`EXACT_KS_PAIRS` window x calibration pairs, asymptotic above."""
    n, m = calibration.n, int(p_values.size)
    if calibration.is_exact:
        below = np.clip(np.rint((n + 1) * (1.0 - p_values)), 0, n).astype(np.int64)  # #{calibration < s}
        if m * n <= EXACT_KS_PAIRS:
            result = stats.ks_2samp(below + 0.5, np.arange(1, n + 1, dtype=np.float64), method="exact")
            return float(result.statistic), float(result.pvalue)
        statistic = _two_sample_statistic(below, n)
    else:
        statistic = float(stats.kstest(p_values, "uniform").statistic)
    return statistic, _asymptotic_p_value(statistic, m, n)


class DriftWindow:
    """Ring buffer of the last ``size`` conformal p-values of one detector state (written by the batch worker,
    read by whoever asks for a reading)."""

    def __init__(self, size: int, active: ActiveDetector) -> None:
        self.size = size
        self.active = active
        self.key = (active.stored.version, active.stored.sha256)
        self._values = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._lock = threading.Lock()
        self.cached: DriftReading | None = None
        self.cached_count = -1
        self.cached_at = -math.inf

    @property
    def count(self) -> int:
        """Images added since the window began (at most ``size`` of them are kept)."""
        return self._count

    def add(self, values: np.ndarray) -> None:
        values = values[-self.size :]
        with self._lock:
            start = self._count % self.size
            first = min(values.size, self.size - start)
            self._values[start : start + first] = values[:first]
            self._values[: values.size - first] = values[first:]
            self._count += int(values.size)

    def snapshot(self) -> tuple[np.ndarray, int]:
        """The kept p-values (oldest first) and :attr:`count` at that moment."""
        with self._lock:
            count = self._count
            if count <= self.size:
                return self._values[:count].copy(), count
            start = count % self.size
            return np.concatenate((self._values[start:], self._values[:start])), count


class DriftMonitor:
    """Windows of every (model, detector) that reported p-values, and their lazily computed, throttled tests."""

    def __init__(
        self,
        window: int = 1000,
        alpha: float = 0.01,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window, self.alpha, self.refresh_s = window, alpha, refresh_s
        self._clock = clock
        self._windows: dict[tuple[str, str], DriftWindow] = {}
        self._lock = threading.Lock()

    def configure(self, window: int, alpha: float, refresh_s: float) -> None:
        """Set the window size, the alarm level and the refresh interval; drops every window."""
        with self._lock:
            self.window, self.alpha, self.refresh_s = window, alpha, refresh_s
            self._windows = {}

    def _window(self, model: str, active: ActiveDetector, create: bool) -> DriftWindow | None:
        key = (model, active.name)
        window = self._windows.get(key)
        if window is not None and window.key == (active.stored.version, active.stored.sha256):
            return window
        if not create:
            return None  # the state changed and no image has been scored with the new one yet
        with self._lock:
            window = self._windows[key] = DriftWindow(self.window, active)
        return window

    def prune(self, model: str, active: set[str]) -> None:
        """Forget the windows of ``model``'s detectors that are no longer served."""
        with self._lock:
            for key in [k for k in self._windows if k[0] == model and k[1] not in active]:
                del self._windows[key]

    def observe(self, model: str, active: ActiveDetector, p_values: Sequence[float | None]) -> None:
        """Add one batch's p-values of ``active`` (``None`` entries, from uncalibrated states, are skipped)."""
        values = np.array([p for p in p_values if p is not None], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size and active.detector.calibration is not None:
            window = self._window(model, active, create=True)
            assert window is not None
            window.add(values)

    def reading(self, model: str, active: ActiveDetector, segmentation: bool = False) -> DriftReading:
        """The tests on ``active``'s window: recomputed when images arrived since the last reading and that one is
        older than ``refresh_s``; otherwise the last one again (so a scrape and ``/drift`` agree)."""
        calibration = active.detector.calibration
        window = None if segmentation or calibration is None else self._window(model, active, create=False)
        if window is None or window.count == 0:
            note = SEGMENTATION_NOTE if segmentation else UNCALIBRATED_NOTE if calibration is None else None
            return self._empty(active, calibration if not segmentation else None, note)
        now = self._clock()
        cached = window.cached
        if cached is not None and (window.cached_count == window.count or now - window.cached_at < self.refresh_s):
            return cached
        assert calibration is not None
        values, count = window.snapshot()
        share, expected, share_p = share_test(values, calibration)
        statistic, ks_p = ks_test(values, calibration)
        result = DriftReading(
            detector=active.name,
            version=active.stored.version,
            window=window.size,
            filled=int(values.size),
            calibration_size=calibration.n,
            target_tpr=calibration.target_tpr,
            ood_share=share,
            expected_share=expected,
            share_p_value=share_p,
            ks_statistic=statistic,
            ks_p_value=ks_p,
            drifting=min(share_p, ks_p) < self.alpha,
        )
        window.cached, window.cached_count, window.cached_at = result, count, now
        return result

    def _empty(self, active: ActiveDetector, calibration: Calibration | None, note: str | None) -> DriftReading:
        return DriftReading(
            detector=active.name,
            version=active.stored.version,
            window=self.window,
            filled=0,
            calibration_size=None if calibration is None else calibration.n,
            target_tpr=None if calibration is None else calibration.target_tpr,
            ood_share=None,
            expected_share=None if calibration is None else verdict_rank(calibration) / (calibration.n + 1),
            share_p_value=None,
            ks_statistic=None,
            ks_p_value=None,
            drifting=False,
            note=note,
        )
