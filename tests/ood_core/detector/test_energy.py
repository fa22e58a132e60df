import math

import torch

from ood_core.detector import EnergyBased

from .common import assert_roundtrip, separable_logits


def test_energy_formula_on_hand_computed_case() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    # -log(e^0 + 3) = -log 4 ; -log(2 e^2) = -(2 + log 2)
    expected = torch.tensor([-math.log(4.0), -(2.0 + math.log(2.0))])
    torch.testing.assert_close(EnergyBased.score(logits), expected)
    # temperature 2: -2 log(e^0 + e^{log(3)/2}) = -2 log(1 + sqrt 3)
    torch.testing.assert_close(
        EnergyBased.score(logits[:1], t=2.0), torch.tensor([-2.0 * math.log(1.0 + math.sqrt(3.0))])
    )


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = EnergyBased(None)
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_segmentation_shape_is_per_pixel() -> None:
    logits = torch.randn(2, 4, 7, 9)
    scores = EnergyBased(None).predict_features(logits)
    assert scores.shape == (2, 7, 9)
    torch.testing.assert_close(scores[1, 3, 5], EnergyBased.score(logits[1:2, :, 3, 5])[0])


def test_predict_passes_input_through_model_and_call_delegates() -> None:
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    det = EnergyBased(model, t=1.5)
    torch.testing.assert_close(det(x), EnergyBased.score(model(x), 1.5))
    assert not list(det.parameters())  # the model is not a submodule


def test_roundtrip(tmp_path) -> None:
    det = EnergyBased(None, t=3.0)
    loaded = assert_roundtrip(det, torch.randn(4, 6), tmp_path)
    assert loaded.t == 3.0
