import math

import pytest
import torch
from torch import nn

from ood_core.api import ModelNotSetException
from ood_core.detector import EnergyBased, WeightedEBO

from .common import assert_roundtrip, separable_logits


def _layer(weights: list[float], bias: float = 0.0) -> nn.Linear:
    layer = nn.Linear(len(weights), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.bias.fill_(bias)
    return layer


def test_weighted_energy_formula_on_hand_computed_case() -> None:
    # -log(2 * 3 + 1 * 1) = -log 7; the bias plays no part
    logits = torch.tensor([[math.log(3.0), 0.0]])
    torch.testing.assert_close(WeightedEBO.score(logits, _layer([2.0, 1.0], bias=5.0)), torch.tensor([-math.log(7.0)]))
    # negative weights are clipped to 0: only class 0 counts, -log(e^0) = 0
    torch.testing.assert_close(
        WeightedEBO(None, _layer([1.0, 0.0, -1.0])).predict_features(torch.tensor([[0.0, 5.0, 7.0]])),
        torch.tensor([0.0]),
    )


def test_unit_weights_give_the_energy_score() -> None:
    logits = torch.randn(6, 4)
    torch.testing.assert_close(WeightedEBO(None, torch.ones(4)).predict_features(logits), EnergyBased.score(logits))


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = WeightedEBO(None, _layer([0.5, 1.0, 2.0, 1.0, 0.7]))
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_segmentation_shape_is_per_pixel() -> None:
    logits = torch.randn(2, 3, 5, 4)
    layer = _layer([0.5, 2.0, 1.0])
    scores = WeightedEBO(None, layer).predict_features(logits)
    assert scores.shape == (2, 5, 4)
    torch.testing.assert_close(scores[1, 2, 3], WeightedEBO.score(logits[1:2, :, 2, 3], layer)[0])


def test_weights_are_state_not_parameters_and_wrong_size_is_rejected() -> None:
    det = WeightedEBO(None, _layer([1.0, 2.0]))
    assert not list(det.parameters())
    assert det.num_classes == 2
    with pytest.raises(ValueError):
        det.predict_features(torch.randn(3, 5))


def test_predict_passes_input_through_model() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    layer = _layer([1.0, 3.0])
    torch.testing.assert_close(WeightedEBO(model, layer)(x), WeightedEBO.score(model(x), layer))


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        WeightedEBO(None, _layer([1.0, 2.0])).predict(torch.randn(2, 2))


def test_roundtrip_rebuilds_the_layer(tmp_path) -> None:
    layer = _layer([0.3, 1.5, 0.9, 2.0], bias=0.25)
    loaded = assert_roundtrip(WeightedEBO(None, layer), torch.randn(5, 4), tmp_path)
    assert isinstance(loaded, WeightedEBO)
    rebuilt = loaded.weights
    assert isinstance(rebuilt, nn.Linear)
    torch.testing.assert_close(rebuilt.weight, layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(rebuilt.bias, layer.bias, rtol=0, atol=0)
