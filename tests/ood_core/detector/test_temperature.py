import math
from pathlib import Path

import pytest
import torch

from ood_core.api import ModelNotSetException, RequiresFitException
from ood_core.detector import MaxSoftmax, TemperatureScaling
from ood_core.detector.temperature import TEMPERATURE_RANGE

from .common import assert_roundtrip, separable_logits


def test_fitted_temperature_on_hand_computed_case() -> None:
    # logits [2 log 3, 0] with labels 0, 0, 0, 1: the NLL is minimal where sigma(2 log 3 / T) = 3/4,
    # i.e. 2 log 3 / T = log 3, T = 2; the score is then -3/4
    logits = torch.tensor([[2.0 * math.log(3.0), 0.0]]).repeat(4, 1)
    det = TemperatureScaling(None).fit_features(logits, torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(det.t, torch.tensor(2.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(det.predict_features(logits[:1]), torch.tensor([-0.75]), rtol=1e-4, atol=0)


def test_recovers_a_known_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    calibrated = 2.0 * torch.randn(3000, 6, generator=g)
    labels = torch.multinomial(calibrated.softmax(dim=1), 1, generator=g).squeeze(1)
    det = TemperatureScaling(None).fit_features(3.0 * calibrated, labels)  # over-confident by a factor 3
    assert abs(float(det.t) - 3.0) < 0.25


def test_ood_labels_are_ignored() -> None:
    logits = torch.tensor([[2.0 * math.log(3.0), 0.0]]).repeat(4, 1)
    labels = torch.tensor([0, 0, 0, 1])
    garbage = torch.tensor([[-9.0, 9.0], [5.0, -5.0]])
    plain = TemperatureScaling(None).fit_features(logits, labels)
    mixed = TemperatureScaling(None).fit_features(
        torch.cat([logits, garbage]), torch.cat([labels, torch.tensor([-1, -1])])
    )
    torch.testing.assert_close(mixed.t, plain.t)


def test_requires_fit() -> None:
    with pytest.raises(RequiresFitException):
        TemperatureScaling(None).predict_features(torch.randn(2, 3))


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    labels = id_logits.argmax(dim=1)
    labels[::8] = (labels[::8] + 1) % id_logits.shape[1]  # a few mistakes, as in real validation data
    det = TemperatureScaling(None).fit_features(id_logits, labels)
    assert TEMPERATURE_RANGE[0] < float(det.t) < TEMPERATURE_RANGE[1]
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def _nll(logits: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """NLL of each temperature of ``t`` (1-D), float64."""
    z = logits.double()[None] / t.double()[:, None, None]
    return -z.log_softmax(dim=2).gather(2, labels[None, :, None].expand(len(t), -1, 1)).squeeze(2).mean(dim=1)


def test_a_normal_case_is_the_unbounded_optimum() -> None:
    # logits [1, 0] with labels 0, 0, 0, 1: sigma(1 / T) = 3/4 at the optimum, T = 1 / log 3 (about 0.910)
    logits = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    t = TemperatureScaling.optimal_temperature(logits, torch.tensor([0, 0, 0, 1]))
    assert t.dtype == torch.float64 and abs(float(t) - 1.0 / math.log(3.0)) < 1e-9
    # several classes: no closed form, the NLL over a fine grid of log T has its minimum next to the fit
    g = torch.Generator().manual_seed(2)
    logits = 4.0 * torch.randn(200, 5, generator=g)
    labels = torch.multinomial((logits / 2.5).softmax(dim=1), 1, generator=g).squeeze(1)
    t = TemperatureScaling.optimal_temperature(logits, labels)
    grid = torch.linspace(math.log(0.5), math.log(10.0), 20001, dtype=torch.float64).exp()
    best = grid[_nll(logits, labels, grid).argmin()]
    assert abs(math.log(float(t) / float(best))) < 2e-4  # within the grid's step
    assert float(_nll(logits, labels, t[None])[0]) <= float(_nll(logits, labels, best[None])[0]) + 1e-12


def test_separable_data_stops_at_the_bounds() -> None:
    """Every label the arg-max: the NLL falls as T -> 0, the fit stops at the lower bound (finite, positive);
    every label against the logits: it stops at the upper bound."""
    id_logits, _ = separable_logits()
    det = TemperatureScaling(None).fit_features(id_logits, id_logits.argmax(dim=1))
    assert float(det.t) == pytest.approx(TEMPERATURE_RANGE[0], rel=1e-6) and math.isfinite(float(det.t))
    worst = TemperatureScaling.optimal_temperature(id_logits, id_logits.argmin(dim=1))
    assert float(worst) == pytest.approx(TEMPERATURE_RANGE[1], rel=1e-12)
    assert float(TemperatureScaling.optimal_temperature(id_logits, id_logits.argmax(dim=1), bounds=(0.5, 2))) == 0.5
    with pytest.raises(ValueError, match="bounds"):
        TemperatureScaling.optimal_temperature(id_logits, id_logits.argmax(dim=1), bounds=(0.0, 1.0))


def test_segmentation_fit_and_scores_are_per_pixel() -> None:
    logits = torch.randn(2, 4, 5, 6)
    labels = logits.argmax(dim=1)
    labels[0, 0, :] = -1  # OOD pixels
    det = TemperatureScaling(None).fit_features(logits, labels)
    scores = det.predict_features(logits)
    assert scores.shape == (2, 5, 6)
    torch.testing.assert_close(scores[1, 2, 3], MaxSoftmax.score(logits[1:2, :, 2, 3], t=float(det.t))[0])


def test_fit_on_loader_matches_fit_features() -> None:
    model = torch.nn.Linear(3, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=g)
    y = torch.randint(0, 4, (60,), generator=g)
    loader = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    from_loader = TemperatureScaling(model).fit(loader)
    with torch.no_grad():
        direct = TemperatureScaling(model).fit_features(model(x), y)
    torch.testing.assert_close(from_loader.t, direct.t)
    torch.testing.assert_close(from_loader(x), MaxSoftmax.score(model(x), t=float(direct.t)))


def test_predict_without_model_raises() -> None:
    id_logits, _ = separable_logits()
    det = TemperatureScaling(None).fit_features(id_logits, id_logits.argmax(dim=1))
    with pytest.raises(ModelNotSetException):
        det.predict(torch.randn(2, 5))


def test_roundtrip(tmp_path: Path) -> None:
    id_logits, _ = separable_logits()
    det = TemperatureScaling(None).fit_features(id_logits, id_logits.argmax(dim=1))
    loaded = assert_roundtrip(det, torch.randn(7, 5), tmp_path)
    assert isinstance(loaded, TemperatureScaling)
    assert float(loaded.t) == float(det.t)
