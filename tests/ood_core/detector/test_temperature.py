import math

import pytest
import torch

from ood_core.api import ModelNotSetException, RequiresFitException
from ood_core.detector import MaxSoftmax, TemperatureScaling

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
    det = TemperatureScaling(None).fit_features(id_logits, labels)
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


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


def test_roundtrip(tmp_path) -> None:
    id_logits, _ = separable_logits()
    det = TemperatureScaling(None).fit_features(id_logits, id_logits.argmax(dim=1))
    loaded = assert_roundtrip(det, torch.randn(7, 5), tmp_path)
    assert isinstance(loaded, TemperatureScaling)
    assert float(loaded.t) == float(det.t)
