import pytest
import torch
from torch import nn

from ood_core.api import FeaturesNotSupportedError, ModelNotSetException
from ood_core.detector import MCD, MaxSoftmax
from ood_core.state import load_detector, save_detector

from .common import separable_logits


class _Cycle(nn.Module):
    """Returns log-probabilities from a fixed list, one entry per call (a stand-in for dropout masks)."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.outputs = [torch.tensor([p]).log() for p in probs]
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out.expand(x.shape[0], -1)


def test_scores_on_hand_computed_case() -> None:
    # two passes: softmax (0.8, 0.2) and (0.6, 0.4); mean (0.7, 0.3); unbiased variance per class
    # (0.1^2 + 0.1^2) / 1 = 0.02, averaged over classes 0.02
    x = torch.zeros(1, 1)
    var = MCD(_Cycle([[0.8, 0.2], [0.6, 0.4]]), samples=2)(x)
    torch.testing.assert_close(var, torch.tensor([0.02]))
    mean = MCD(_Cycle([[0.8, 0.2], [0.6, 0.4]]), samples=2, mode="mean")(x)
    torch.testing.assert_close(mean, torch.tensor([-0.7]))
    top, class_var = MCD.run(_Cycle([[0.8, 0.2], [0.6, 0.4]]), x, samples=2)
    torch.testing.assert_close((top, class_var), (torch.tensor([0.7]), torch.tensor([0.02])))
    torch.testing.assert_close(MCD.run_mean(_Cycle([[0.8, 0.2], [0.6, 0.4]]), x, 2), torch.tensor([[0.7, 0.3]]))


def test_deterministic_model_has_zero_variance_and_mean_is_msp() -> None:
    model = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(MCD(model, samples=3)(x), torch.zeros(5))
    torch.testing.assert_close(MCD(model, samples=3, mode="mean")(x), MaxSoftmax.score(model(x)))


def test_dropout_is_active_and_modes_are_restored() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Linear(4, 8), bn, nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    assert bn.running_mean is not None
    stats_before = bn.running_mean.clone()
    scores = MCD(model, samples=5)(torch.randn(6, 4))
    assert (scores > 0).all()  # dropout made the passes differ
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(bn.running_mean, stats_before, rtol=0, atol=0)  # batch norm stayed in eval
    MCD(model, samples=2, batch_norm=False)(torch.randn(6, 4))
    assert not torch.equal(bn.running_mean, stats_before)  # batch norm ran in training mode
    assert not any(m.training for m in model.modules())


def test_ood_scores_higher() -> None:
    torch.manual_seed(0)
    id_logits, ood_logits = separable_logits()
    model = nn.Dropout(0.1)
    det = MCD(model, samples=30, mode="mean")
    assert det(ood_logits).min() > det(id_logits).max()


def test_segmentation_scores_are_per_pixel() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=1), nn.Dropout2d(0.3))
    x = torch.randn(2, 3, 5, 6)
    for mode in ("var", "mean"):
        assert MCD(model, samples=3, mode=mode)(x).shape == (2, 5, 6)
    top, class_var = MCD.run(model, x, samples=3)
    assert top.shape == class_var.shape == (2, 5, 6)


def test_features_are_not_supported_and_invalid_settings_are_rejected() -> None:
    with pytest.raises(FeaturesNotSupportedError):
        MCD(nn.Identity()).predict_features(torch.randn(2, 3))
    with pytest.raises(ValueError):
        MCD(nn.Identity(), mode="max")
    with pytest.raises(ValueError):
        MCD(nn.Identity(), samples=1)


def test_predict_without_model_raises() -> None:
    with pytest.raises(ModelNotSetException):
        MCD(None).predict(torch.randn(2, 3))
    with pytest.raises(ModelNotSetException):
        MCD.run(None, torch.randn(2, 3), samples=2)
    with pytest.raises(ModelNotSetException):
        MCD.run_mean(None, torch.randn(2, 3), samples=2)


def test_roundtrip_through_state_keeps_hyperparameters_and_scores(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 4))
    det = MCD(model, samples=4, mode="mean", batch_norm=False)
    save_detector(det, tmp_path / "mcd.safetensors")
    loaded = load_detector(tmp_path / "mcd.safetensors", model=model)
    assert isinstance(loaded, MCD)
    assert loaded.hparams() == {"samples": 4, "mode": "mean", "batch_norm": False}
    x = torch.randn(6, 3)
    torch.manual_seed(1)
    before = det(x)
    torch.manual_seed(1)
    torch.testing.assert_close(loaded(x), before, rtol=0, atol=0)
