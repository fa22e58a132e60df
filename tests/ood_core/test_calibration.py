import pytest
import torch
from safetensors.torch import load

from ood_core.api import InvalidStateError
from ood_core.calibration import MAX_EXACT, Calibration
from ood_core.detector import Mahalanobis
from ood_core.state import load_detector, save_detector

from .state_helpers import resave, split_state


def brute_threshold(scores: torch.Tensor, tpr: float) -> float:
    """Smallest calibration score t with #{s <= t} / n >= tpr."""
    candidates = [float(t) for t in scores if (scores <= t).double().mean() >= tpr - 1e-12]
    return min(candidates)


def brute_p_values(calibration: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    greater_equal = (calibration.double()[None, :] >= query.double()[:, None]).sum(1).double()
    return (1 + greater_equal) / (calibration.numel() + 1)


def test_threshold_on_hand_computed_case() -> None:
    cal = Calibration.from_scores(torch.tensor([4.0, 1.0, 3.0, 2.0]))
    # 2 of 4 <= 2.0 (50 %), 3 of 4 <= 3.0 (75 %), 4 of 4 <= 4.0
    assert cal.threshold(0.5) == 2.0 and cal.threshold(0.6) == 3.0 and cal.threshold(0.75) == 3.0
    assert cal.threshold(1.0) == 4.0
    with pytest.raises(ValueError):
        cal.threshold(0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_exact_mode_matches_brute_force(tied: bool) -> None:
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(300, generator=g)
    if tied:
        scores = torch.round(scores * 2) / 2  # only a handful of distinct values
    cal = Calibration.from_scores(scores, target_tpr=0.9)
    assert cal.is_exact and cal.n == 300
    for tpr in (0.05, 0.5, 0.9, 0.95, 0.999):
        assert cal.threshold(tpr) == brute_threshold(scores, tpr)
    assert cal.threshold() == brute_threshold(scores, 0.9)
    query = torch.cat([torch.randn(100, generator=g) * 2, scores[:50], torch.tensor([-100.0, 100.0])])
    torch.testing.assert_close(cal.p_values(query), brute_p_values(scores, query), rtol=0, atol=1e-15)
    p = cal.p_values(query)
    assert p.min() >= 1 / 301 and p.max() <= 1.0


def test_p_values_keep_shape() -> None:
    cal = Calibration.from_scores(torch.arange(10.0))
    assert cal.p_values(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


@pytest.mark.parametrize("n", [MAX_EXACT + 1, 3 * MAX_EXACT])
def test_sketch_above_max_exact_is_compact_and_close(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=g, dtype=torch.float64) ** 3  # heavy tails
    cal = Calibration.from_scores(scores)
    assert not cal.is_exact and cal.quantiles.numel() == MAX_EXACT and cal.n == n
    query = torch.cat([torch.randn(1000, generator=g, dtype=torch.float64) * 2, scores[:200]])
    count_error = (cal.p_values(query) - brute_p_values(scores, query)).abs() * (n + 1)
    # sketch points are n / (MAX_EXACT - 1) order statistics apart, plus one for the discrete count
    assert count_error.max() <= n / (MAX_EXACT - 1) + 1
    for tpr in (0.5, 0.9, 0.95, 0.99):
        accepted = (scores <= cal.threshold(tpr)).double().mean().item()
        assert abs(accepted - tpr) <= 1 / (MAX_EXACT - 1) + 1 / n


def test_saved_with_the_detector_and_loaded_back(tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    y = torch.arange(30) % 3
    det = Mahalanobis(None).fit_features(torch.randn(30, 4, generator=g) + y[:, None], y)
    held_out = det.predict_features(torch.randn(50, 4, generator=g))
    cal = Calibration.from_scores(held_out, target_tpr=0.8)
    path = tmp_path / "det.safetensors"
    save_detector(det, path, calibration=cal)
    loaded = load_detector(path)
    assert loaded.calibration is not None
    assert (loaded.calibration.n, loaded.calibration.target_tpr) == (50, 0.8)
    assert loaded.calibration.threshold() == cal.threshold()
    query = torch.randn(20)
    torch.testing.assert_close(loaded.calibration.p_values(query), cal.p_values(query))

    tensors, meta = split_state(path.read_bytes())
    unsorted = dict(tensors, **{"calibration.quantiles": tensors["calibration.quantiles"].flip(0)})
    with pytest.raises(InvalidStateError, match="sorted"):
        load_detector(resave(unsorted, meta))
    without = {k: v for k, v in tensors.items() if not k.startswith("calibration.")}
    with pytest.raises(InvalidStateError, match="calibration"):
        load_detector(resave(without, meta))
    no_meta = {k: v for k, v in meta.items() if k != "calibration"}
    with pytest.raises(InvalidStateError, match="calibration"):
        load_detector(resave(tensors, no_meta))


def test_sketch_is_saved_compactly_and_loads_back(tmp_path) -> None:
    g = torch.Generator().manual_seed(7)
    y = torch.arange(30) % 3
    det = Mahalanobis(None).fit_features(torch.randn(30, 4, generator=g) + y[:, None], y)
    cal = Calibration.from_scores(torch.randn(4 * MAX_EXACT, generator=g))
    path = tmp_path / "sketch.safetensors"
    save_detector(det, path, calibration=cal)
    assert load(path.read_bytes())["calibration.quantiles"].numel() == MAX_EXACT
    loaded = load_detector(path).calibration
    assert loaded is not None and not loaded.is_exact and loaded.n == 4 * MAX_EXACT
    query = torch.randn(100, generator=g)
    torch.testing.assert_close(loaded.p_values(query), cal.p_values(query), rtol=0, atol=0)
    assert loaded.threshold() == cal.threshold()
