import math

import pytest
import torch

from ood_core.api import ModelNotSetException
from ood_core.detector import GEN

from .common import assert_roundtrip, separable_logits


def test_gen_formula_on_hand_computed_case() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    # gamma 1/2: sqrt(1/4 * 3/4) + sqrt(3/4 * 1/4) = sqrt(3) / 2
    torch.testing.assert_close(GEN.score(logits, gamma=0.5), torch.tensor([math.sqrt(3.0) / 2.0]))
    # M = 1 keeps only the top probability: sqrt(3) / 4
    torch.testing.assert_close(GEN.score(logits, gamma=0.5, M=1), torch.tensor([math.sqrt(3.0) / 4.0]))
    # gamma 1, uniform over 3 classes: 3 * (1/3)(2/3) = 2/3 (summed over classes, as in the paper)
    torch.testing.assert_close(GEN.score(torch.zeros(1, 3), gamma=1.0), torch.tensor([2.0 / 3.0]))


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    for det in (GEN(None), GEN(None, gamma=0.5, M=3)):
        assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_segmentation_shape_is_per_pixel() -> None:
    logits = torch.randn(2, 6, 7, 9)
    scores = GEN(None, gamma=0.2, M=4).predict_features(logits)
    assert scores.shape == (2, 7, 9)
    torch.testing.assert_close(scores[0, 4, 8], GEN.score(logits[0:1, :, 4, 8], gamma=0.2, M=4)[0])


def test_invalid_hyperparameters_are_rejected() -> None:
    for kwargs in ({"gamma": 0.0}, {"M": 0}, {"M": 1.5}):
        with pytest.raises(ValueError):
            GEN(None, **kwargs)


def test_predict_passes_input_through_model() -> None:
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(GEN(model, M=2)(x), GEN.score(model(x), M=2))


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        GEN(None).predict(torch.randn(2, 3))


def test_roundtrip(tmp_path) -> None:
    loaded = assert_roundtrip(GEN(None, gamma=0.3, M=2), torch.randn(4, 6), tmp_path)
    assert (loaded.gamma, loaded.M) == (0.3, 2)
