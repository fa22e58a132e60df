from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.detector import Mahalanobis, MahalanobisODIN
from ood_core.state import load_detector, save_detector

from .shards import assert_shards_merge_to_stream
from .synthetic import separable_features

# two classes around (0, 0) and (4, 0), each with the four unit steps: pooled ML covariance diag(0.5, 0.5)
STEPS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
Z = torch.cat([STEPS, STEPS + torch.tensor([4.0, 0.0])])
Y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def fitted(**kwargs: object) -> MahalanobisODIN:
    return MahalanobisODIN(nn.Identity(), **kwargs).fit_features(Z, Y)  # type: ignore[arg-type]


def test_perturbed_distance_on_a_hand_computed_case() -> None:
    x = torch.tensor([[1.0, 0.5]])
    # precision diag(2, 2); closest centre (0, 0); gradient 2 P (x - mu) = (4, 2): sign (1, 1)
    # eps = 0.1: x~ = (0.9, 0.4), distance 2 (0.81 + 0.16) = 1.94 (unperturbed: 2 (1 + 0.25) = 2.5)
    torch.testing.assert_close(fitted(eps=0.1).predict(x), torch.tensor([1.94]))
    # norm_std (0.5, 2): steps 0.1 / 0.5 and 0.1 / 2: x~ = (0.8, 0.45), distance 2 (0.64 + 0.2025)
    torch.testing.assert_close(fitted(eps=0.1, norm_std=[0.5, 2.0]).predict(x), torch.tensor([1.685]))
    # eps = 0: the Mahalanobis score; predict_features never perturbs
    torch.testing.assert_close(fitted(eps=0.0).predict(x), torch.tensor([2.5]))
    torch.testing.assert_close(fitted(eps=0.1).predict_features(x), torch.tensor([2.5]))


def test_each_sample_is_perturbed_on_its_own() -> None:
    x = torch.tensor([[1.0, 0.5], [3.0, -0.2], [10.0, 10.0]])
    det = fitted(eps=0.05)
    together = det.predict(x)
    alone = torch.cat([det.predict(row[None]) for row in x])
    torch.testing.assert_close(together, alone)


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, y, ood_z = separable_features()
    linear = nn.Linear(16, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(16) * 0.5)
        linear.bias.zero_()
    encoder = nn.Sequential(linear, nn.Tanh())
    det = MahalanobisODIN(encoder).fit([(id_z, y)])
    assert det.predict(id_z).max() < det.predict(ood_z).min()


def test_needs_a_fit_and_the_encoder() -> None:
    with pytest.raises(RequiresFitException):
        MahalanobisODIN(nn.Identity()).predict(Z)
    det = MahalanobisODIN(None).fit_features(Z, Y)
    with pytest.raises(ValueError, match="encoder"):
        det.predict(Z)
    assert MahalanobisODIN.input_kind == "input"


def test_save_load_roundtrip_with_the_encoder_given_again(tmp_path: Path) -> None:
    det = fitted(eps=0.01, norm_std=[0.3, 0.3])
    path = tmp_path / "m.safetensors"
    save_detector(det, path)
    loaded = load_detector(path, encoder=nn.Identity())
    assert type(loaded) is MahalanobisODIN and loaded.hparams() == det.hparams()
    x = torch.randn(7, 2)
    torch.testing.assert_close(loaded.predict(x), det.predict(x), rtol=0, atol=0)
    torch.testing.assert_close(load_detector(path, model=nn.Identity()).predict(x), det.predict(x), rtol=0, atol=0)


def test_fit_statistics_merge_like_mahalanobis() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    z = 3.0 * torch.randn(3, 5, generator=g)[y] + torch.randn(96, 5, generator=g)
    batches = list(zip(z.split(16), y.split(16), strict=True))
    merged = assert_shards_merge_to_stream(lambda: MahalanobisODIN(None), batches, torch.randn(8, 5, generator=g))
    plain = Mahalanobis(None).fit_features(z, y)
    torch.testing.assert_close(merged.precision, plain.precision, rtol=1e-5, atol=1e-6)
