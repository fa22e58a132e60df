"""The drift tests on a window of conformal p-values: formulas on hand-computed cases, their calibration under
exchangeable traffic (and why the plain one-sample tests are not used), the ring buffer and the monitor's
per-version windows and throttling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ood_core.calibration import Calibration
from ood_core.detector import MaxSoftmax
from service.engine.active import ActiveDetector, StoredState
from service.engine.drift import DriftMonitor, DriftWindow, ks_test, share_test, verdict_rank


def _active(calibration: Calibration | None, version: int = 1, name: str = "det") -> ActiveDetector:
    detector = MaxSoftmax()
    detector.calibration = calibration
    stored = StoredState("m", name, version, f"sha{version}", 1, "MaxSoftmax", "2024-01-01T00:00:00Z")
    return ActiveDetector(name, detector, stored)


def _p(calibration: Calibration, scores: np.ndarray) -> np.ndarray:
    return calibration.p_values(torch.as_tensor(scores, dtype=torch.float64)).numpy()


def test_share_test_on_a_hand_computed_case() -> None:
    """n = 9 scores 1..9, tpr 0.8: k = ceil(7.2) = 8, threshold 8, a = 2; scores 8.5 and 9.5 are over it.
    P(K >= 2) for K ~ BetaBinomial(4, 2, 8) = 1 - 6/13 - 48/143 = 29/143."""
    calibration = Calibration(torch.arange(1.0, 10.0), target_tpr=0.8)
    assert calibration.threshold() == 8.0 and verdict_rank(calibration) == 2
    p = _p(calibration, np.array([8.5, 9.5, 3.0, 7.9]))
    np.testing.assert_allclose(p, [0.2, 0.1, 0.8, 0.3])
    share, expected, p_value = share_test(p, calibration)
    assert share == 0.5 and expected == pytest.approx(0.2)
    assert p_value == pytest.approx(29 / 143)


def test_the_share_counts_exactly_the_served_verdicts_at_the_default_threshold() -> None:
    rng = np.random.default_rng(1)
    for n, tpr in ((163, 0.95), (50, 0.9), (7, 0.5), (1000, 0.99)):
        calibration = Calibration(torch.as_tensor(rng.normal(size=n)), target_tpr=tpr)
        scores = np.concatenate((rng.normal(size=500), calibration.quantiles.numpy()))  # ties at every c_(i)
        share, _, _ = share_test(_p(calibration, scores), calibration)
        assert share == pytest.approx(float(np.mean(scores > calibration.threshold())))


def test_ks_on_a_hand_computed_case_and_rank_invariance() -> None:
    """Calibration 1, 2, 3; window 2.5, 2.6: both p = 2/4, ECDFs 0 vs 2/3 just below 2.5, so D = 2/3."""
    calibration = Calibration(torch.tensor([1.0, 2.0, 3.0]))
    statistic, _ = ks_test(_p(calibration, np.array([2.5, 2.6])), calibration)
    assert statistic == pytest.approx(2 / 3)
    rng = np.random.default_rng(2)
    for m, n, method in ((40, 30, "exact"), (1000, 163, "exact"), (3000, 1000, "asymp")):  # two-sample on the scores
        cal, window = rng.normal(size=n), rng.normal(0.1, 1.0, size=m)
        calibration = Calibration(torch.as_tensor(cal))
        statistic, p_value = ks_test(_p(calibration, window), calibration)
        expected = stats.ks_2samp(window, cal, method=method)
        assert statistic == pytest.approx(expected.statistic) and p_value == pytest.approx(expected.pvalue, rel=0.05)


def test_a_sketched_calibration_uses_the_two_sample_null() -> None:
    rng = np.random.default_rng(3)
    calibration = Calibration.from_scores(torch.as_tensor(rng.normal(size=20_000)), max_exact=2000)
    assert not calibration.is_exact
    window = rng.normal(size=1000)
    statistic, p_value = ks_test(_p(calibration, window), calibration)
    reference = stats.ks_2samp(window, rng.normal(size=20_000))  # same sizes, an independent calibration
    assert abs(statistic - reference.statistic) < 0.05 and p_value > 0.01
    _, shifted = ks_test(_p(calibration, window + 0.5), calibration)
    assert shifted < 1e-10


def test_tests_hold_their_level_on_exchangeable_traffic_where_the_plain_ones_do_not() -> None:
    """n = 163 calibration scores (the demo's), windows of 1000 ID scores, 300 draws: the monitor's tests reject
    at 5% about 5% of the time; scipy.stats.binomtest at 1 - tpr and kstest against uniform, which ignore the
    calibration's own sampling error, reject far more often. Shifted traffic is caught."""
    rng = np.random.default_rng(4)
    n, m, draws = 163, 1000, 300
    share_alarms = ks_alarms = naive_share = naive_ks = 0
    for _ in range(draws):
        calibration = Calibration(torch.as_tensor(rng.normal(size=n)), target_tpr=0.95)
        p = _p(calibration, rng.normal(size=m))
        share, _, share_p = share_test(p, calibration)
        _, ks_p = ks_test(p, calibration)
        share_alarms += share_p < 0.05
        ks_alarms += ks_p < 0.05
        naive_share += stats.binomtest(round(share * m), m, 0.05).pvalue < 0.05
        naive_ks += stats.kstest(p, "uniform").pvalue < 0.05
    assert share_alarms / draws < 0.09 and ks_alarms / draws < 0.09
    assert naive_share / draws > 0.3 and naive_ks / draws > 0.8
    calibration = Calibration(torch.as_tensor(rng.normal(size=n)), target_tpr=0.95)
    p = _p(calibration, rng.normal(1.0, 1.0, size=m))
    assert share_test(p, calibration)[2] < 1e-6 and ks_test(p, calibration)[1] < 1e-6


def test_the_ring_buffer_keeps_the_last_values_in_order() -> None:
    window = DriftWindow(5, _active(Calibration(torch.arange(3.0))))
    window.add(np.array([1.0, 2.0, 3.0]))
    assert window.snapshot()[0].tolist() == [1.0, 2.0, 3.0]
    window.add(np.array([4.0, 5.0, 6.0, 7.0]))
    values, count = window.snapshot()
    assert values.tolist() == [3.0, 4.0, 5.0, 6.0, 7.0] and count == 7
    window.add(np.arange(10.0, 22.0))
    assert window.snapshot()[0].tolist() == [17.0, 18.0, 19.0, 20.0, 21.0]


def test_monitor_windows_per_version_throttling_and_notes() -> None:
    now = [0.0]
    monitor = DriftMonitor(window=100, alpha=0.01, refresh_s=1.0, clock=lambda: now[0])
    calibration = Calibration(torch.as_tensor(np.random.default_rng(5).normal(size=200)))
    active = _active(calibration)
    assert monitor.reading("m", active).filled == 0
    monitor.observe("m", active, [0.5, 0.25, None])
    first = monitor.reading("m", active)
    assert first.filled == 2 and first.calibration_size == 200 and not first.drifting
    monitor.observe("m", active, [0.01] * 30)
    assert monitor.reading("m", active) is first  # within refresh_s: the last reading again
    now[0] = 1.5
    second = monitor.reading("m", active)
    assert second.filled == 32 and second.drifting and second.share_p_value is not None
    now[0] = 10.0
    assert monitor.reading("m", active) is second  # nothing new: not recomputed
    replaced = _active(calibration, version=2)
    assert monitor.reading("m", replaced).filled == 0  # a new state version starts an empty window
    monitor.observe("m", replaced, [0.5])
    assert monitor.reading("m", replaced).filled == 1 and monitor.reading("m", replaced).version == 2
    assert monitor.reading("m", _active(None)).note is not None  # uncalibrated: nothing to test
    assert monitor.reading("m", active, segmentation=True).note is not None
    monitor.prune("m", set())
    assert monitor.reading("m", replaced).filled == 0
