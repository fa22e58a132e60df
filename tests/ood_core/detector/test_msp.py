import math

import pytest
import torch

from ood_core.api import ModelNotSetException
from ood_core.detector import MaxSoftmax

from .common import assert_roundtrip, separable_logits


def test_msp_formula_on_hand_computed_case() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    # softmax: [1/4, 3/4] and [1/2, 1/2]
    torch.testing.assert_close(MaxSoftmax.score(logits), torch.tensor([-0.75, -0.5]))
    # temperature 2: softmax([0, log(3)/2]) = [1, sqrt 3] / (1 + sqrt 3)
    sqrt3 = math.sqrt(3.0)
    torch.testing.assert_close(MaxSoftmax.score(logits[:1], t=2.0), torch.tensor([-sqrt3 / (1.0 + sqrt3)]))


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = MaxSoftmax(None)
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_segmentation_shape_is_per_pixel() -> None:
    logits = torch.randn(2, 4, 7, 9)
    scores = MaxSoftmax(None, t=2.0).predict_features(logits)
    assert scores.shape == (2, 7, 9)
    torch.testing.assert_close(scores[1, 3, 5], MaxSoftmax.score(logits[1:2, :, 3, 5], t=2.0)[0])


def test_predict_passes_input_through_model() -> None:
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(MaxSoftmax(model)(x), MaxSoftmax.score(model(x)))


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        MaxSoftmax(None).predict(torch.randn(2, 3))


def test_non_positive_temperature_is_rejected() -> None:
    with pytest.raises(ValueError):
        MaxSoftmax(None, t=0.0)


def test_roundtrip(tmp_path) -> None:
    loaded = assert_roundtrip(MaxSoftmax(None, t=3.0), torch.randn(4, 6), tmp_path)
    assert loaded.t == 3.0
