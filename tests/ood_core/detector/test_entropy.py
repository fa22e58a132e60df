import math

import pytest
import torch

from ood_core.api import ModelNotSetException
from ood_core.detector import Entropy

from .common import assert_roundtrip, separable_logits


def test_entropy_formula_on_hand_computed_case() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]])
    # uniform over 4 classes: log 4; softmax [1/4, 3/4, 0, 0]: -(1/4 log 1/4 + 3/4 log 3/4)
    expected = torch.tensor([math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    torch.testing.assert_close(Entropy.score(logits), expected)


def test_saturated_logits_give_zero_not_nan() -> None:
    scores = Entropy.score(torch.tensor([[1000.0, 0.0, -1000.0]]))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.zeros(1))


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = Entropy(None)
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_segmentation_shape_is_per_pixel() -> None:
    logits = torch.randn(2, 4, 7, 9)
    scores = Entropy(None).predict_features(logits)
    assert scores.shape == (2, 7, 9)
    torch.testing.assert_close(scores[1, 6, 0], Entropy.score(logits[1:2, :, 6, 0])[0])


def test_predict_passes_input_through_model() -> None:
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(Entropy(model)(x), Entropy.score(model(x)))


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        Entropy(None).predict(torch.randn(2, 3))


def test_roundtrip(tmp_path) -> None:
    assert_roundtrip(Entropy(None), torch.randn(4, 6), tmp_path)
