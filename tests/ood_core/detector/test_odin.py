import math

import pytest
import torch
from torch import nn

from ood_core.api import FeaturesNotSupportedError, ModelNotSetException
from ood_core.detector import ODIN, odin_preprocessing
from ood_core.state import load_detector, save_detector

from .common import separable_logits


def _identity_linear() -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    return layer


def test_preprocessing_on_hand_computed_case() -> None:
    # f(x) = x, x = (2, 1): predicted class 0, d NLL / dx = (softmax(x / T) - e_0) / T has signs (-, +),
    # so the step x - eps * sign moves to (2 + eps, 1 - eps)
    x = torch.tensor([[2.0, 1.0]])
    x_hat = odin_preprocessing(_identity_linear(), x, eps=0.1, temperature=10.0)
    torch.testing.assert_close(x_hat, torch.tensor([[2.1, 0.9]]))
    # norm_std divides the step per channel
    x_hat = odin_preprocessing(_identity_linear(), x, eps=0.1, temperature=10.0, norm_std=[2.0, 4.0])
    torch.testing.assert_close(x_hat, torch.tensor([[2.05, 0.975]]))
    # an explicit target reverses the direction
    x_hat = odin_preprocessing(_identity_linear(), x, y=torch.tensor([1]), eps=0.1, temperature=10.0)
    torch.testing.assert_close(x_hat, torch.tensor([[1.9, 1.1]]))


def test_score_on_hand_computed_case() -> None:
    # x_hat = (2.1, 0.9); score = -softmax(x_hat / 10)_0 = -1 / (1 + exp(-0.12))
    det = ODIN(_identity_linear(), eps=0.1, temperature=10.0)
    torch.testing.assert_close(det(torch.tensor([[2.0, 1.0]])), torch.tensor([-1.0 / (1.0 + math.exp(-0.12))]))


def test_model_gradients_are_untouched_and_inference_mode_works() -> None:
    model = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    expected = ODIN(model)(x)
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        x_inference = x.clone()  # an inference tensor, as under pytorch-lightning's predict loop
        torch.testing.assert_close(ODIN(model)(x_inference), expected)


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = ODIN(nn.Identity())
    assert det(ood_logits).min() > det(id_logits).max()


def test_segmentation_scores_are_per_pixel() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, kernel_size=1)
    scores = ODIN(model, eps=0.01)(torch.randn(2, 3, 5, 6))
    assert scores.shape == (2, 5, 6)


def test_features_are_not_supported() -> None:
    with pytest.raises(FeaturesNotSupportedError):
        ODIN(nn.Identity()).predict_features(torch.randn(2, 3))


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        ODIN(None).predict(torch.randn(2, 3))
    with pytest.raises(ModelNotSetException):
        odin_preprocessing(None, torch.randn(2, 3))


def test_roundtrip_through_state_keeps_hyperparameters_and_scores(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    det = ODIN(model, eps=0.02, temperature=100.0, norm_std=[0.5, 0.25, 1.0])
    save_detector(det, tmp_path / "odin.safetensors")
    loaded = load_detector(tmp_path / "odin.safetensors", model=model)
    assert isinstance(loaded, ODIN)
    assert loaded.hparams() == {"eps": 0.02, "temperature": 100.0, "norm_std": [0.5, 0.25, 1.0]}
    x = torch.randn(6, 3)
    torch.testing.assert_close(loaded(x), det(x), rtol=0, atol=0)


def test_custom_criterion_cannot_be_saved() -> None:
    det = ODIN(nn.Identity(), criterion=nn.functional.nll_loss)
    with pytest.raises(ValueError):
        save_detector(det)
