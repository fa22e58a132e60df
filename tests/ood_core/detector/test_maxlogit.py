import pytest
import torch

from ood_core.api import ModelNotSetException
from ood_core.detector import MaxLogit

from .common import assert_roundtrip, separable_logits


def test_maxlogit_formula_on_hand_computed_case() -> None:
    logits = torch.tensor([[1.0, 5.0, -2.0], [-3.0, -1.0, -4.0]])
    torch.testing.assert_close(MaxLogit.score(logits), torch.tensor([-5.0, 1.0]))


def test_score_keeps_logit_magnitude_unlike_softmax() -> None:
    # same softmax, different evidence: shifting all logits up lowers the score
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    assert MaxLogit.score(logits + 10.0) < MaxLogit.score(logits)


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = MaxLogit(None)
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_segmentation_shape_is_per_pixel() -> None:
    logits = torch.randn(2, 4, 7, 9)
    scores = MaxLogit(None).predict_features(logits)
    assert scores.shape == (2, 7, 9)
    assert scores[0, 2, 3] == -logits[0, :, 2, 3].max()


def test_predict_passes_input_through_model() -> None:
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(MaxLogit(model)(x), -model(x).max(dim=1).values)


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        MaxLogit(None).predict(torch.randn(2, 3))


def test_roundtrip(tmp_path) -> None:
    assert_roundtrip(MaxLogit(None), torch.randn(4, 6), tmp_path)
