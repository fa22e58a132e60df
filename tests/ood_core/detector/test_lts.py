from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.detector import LTS, EnergyBased, MaxLogit
from ood_core.state import save_detector

from .common import assert_roundtrip
from .synthetic import block_head, separable_features


def head() -> nn.Linear:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    return layer


def test_logits_are_scaled_by_the_squared_mass_ratio() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    # p = 0.25 of D = 4: k = 4 - round(3) = 1; ReLU -> [3, 1, 0, 0]: S = ((3 + 1) / 3)^2; logits [3, 1]
    factor = (4.0 / 3.0) ** 2
    torch.testing.assert_close(LTS.scaling_factor(z, 0.25), torch.tensor([factor]))
    det = LTS(None, head(), p=0.25, detector=MaxLogit.score)
    torch.testing.assert_close(det.predict_features(z), torch.tensor([-3.0 * factor]))
    energy = LTS(None, head(), p=0.25)  # energy by default
    torch.testing.assert_close(energy.predict_features(z), EnergyBased.score(factor * torch.tensor([[3.0, 1.0]])))


def test_k_is_at_least_one_and_samples_without_activations_are_not_scaled() -> None:
    z = torch.tensor([[2.0, 1.0, 1.0, 0.0], [-1.0, -2.0, 0.0, -3.0]])
    # p = 0.05 of 4: k = max(1, 4 - round(3.8)) = 1 -> (4 / 2)^2; the second row has no positive activation
    torch.testing.assert_close(LTS.scaling_factor(z, 0.05), torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(LTS.scaling_factor(z, 1.0), torch.tensor([1.0, 1.0]))


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, _, ood_z = separable_features()
    det = LTS(None, block_head())
    assert det.predict_features(ood_z).min() > det.predict_features(id_z).max()


def test_needs_no_fit_and_validates_arguments(tmp_path: Path) -> None:
    z = torch.rand(5, 4)
    assert LTS(None, head()).fit_features(z, torch.zeros(5)).is_fitted
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LTS(None, head(), p=5)
    with pytest.raises(ValueError, match="batched"):
        LTS.scaling_factor(torch.rand(4), 0.1)
    with pytest.raises(ValueError, match="LTS cannot be saved"):
        save_detector(LTS(None, head(), detector=lambda logits: logits.sum(1)))


def test_roundtrip_with_a_named_score_and_the_encoder_path(tmp_path: Path) -> None:
    det = LTS(nn.Identity(), head(), p=0.5, detector="MaxSoftmax")
    z = torch.rand(6, 4)
    loaded = assert_roundtrip(det, z, tmp_path, head=head())
    assert loaded.hparams() == {"p": 0.5, "detector": "MaxSoftmax"}
    torch.testing.assert_close(det.predict(z), det.predict_features(z))  # predict runs the encoder
