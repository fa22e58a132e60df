import math

import pytest
import torch
from torch import nn

from ood_core.detector import ASH, SCALE, EnergyBased
from ood_core.state import save_detector

from .common import assert_roundtrip


def test_scale_on_hand_computed_vector() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # n = 4, p = 0.5: top-2 sum s2 = 7, total s1 = 10, nothing pruned
    torch.testing.assert_close(SCALE.scale(x, 0.5), x * math.exp(10 / 7))
    # p = 0: s2 = s1, factor e
    torch.testing.assert_close(SCALE.scale(x, 0.0), x * math.e)


def test_feature_maps_get_one_factor_per_sample() -> None:
    maps = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[4.0, 0.0]], [[1.0, 2.0]]]])  # 2 x 2 x 1 x 2
    factor = torch.tensor([math.exp(10 / 7), math.exp(7 / 6)]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(SCALE.scale(maps, 0.5), maps * factor)


def test_scale_is_ash_s_without_pruning_at_equal_factor() -> None:
    x = torch.rand(3, 4, 2, 2)
    ash = ASH.ash_s(x, 0.6)
    kept = ash != 0
    torch.testing.assert_close(SCALE.scale(x, 0.6)[kept], ash[kept])
    assert (SCALE.scale(x, 0.6) != 0).all()


def test_prediction_unchanged_for_bias_free_homogeneous_head() -> None:
    # exp(s1/s2) > 0 multiplies every activation of a sample: argmax of a bias-free linear head is kept,
    # whatever the signs of the activations
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4, bias=False))
    maps = torch.randn(20, 6, 3, 3)
    with torch.no_grad():
        assert torch.equal(head(SCALE.scale(maps, 0.85)).argmax(1), head(maps).argmax(1))


def test_a_bias_can_change_the_prediction() -> None:
    head = nn.Linear(2, 2)
    head.weight.data = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    head.bias.data = torch.tensor([0.0, 3.0])
    x = torch.tensor([[1.0, 1.0]])  # logits [2, 3]; scaled by e^2: [14.8, 3]
    with torch.no_grad():
        assert head(x).argmax(1).item() == 1
        assert head(SCALE.scale(x, 0.5)).argmax(1).item() == 0


def test_default_percentile_and_validation() -> None:
    assert SCALE(None, None).percentile == 0.85
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SCALE(None, None, percentile=85)


def test_predict_and_segmentation() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    head = nn.Conv2d(4, 3, kernel_size=1)
    x = torch.randn(2, 3, 5, 6)
    det = SCALE(backbone, head, percentile=0.7)
    scores = det(x)
    assert scores.shape == (2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(scores, EnergyBased.score(head(SCALE.scale(backbone(x), 0.7))))


def test_ood_scores_higher_when_id_activations_are_dense_and_ood_spiky() -> None:
    # the paper's observation: ID activations are spread over many units (large s1/s2, strong scaling),
    # OOD ones concentrated on a few (s1/s2 near 1); both have the same total activation here
    g = torch.Generator().manual_seed(0)
    classes, dim = 4, 32
    head = nn.Linear(dim, classes, bias=False)
    head.weight.data = torch.rand(classes, dim, generator=g)
    y = torch.randint(0, classes, (32,), generator=g)
    id_feats = head.weight.data[y] * (0.8 + 0.4 * torch.rand(32, dim, generator=g))
    spikes = torch.rand(32, dim, generator=g).topk(3, dim=1).indices
    ood_feats = torch.zeros(32, dim).scatter(1, spikes, id_feats.sum(1, keepdim=True).expand(32, 3) / 3)
    det = SCALE(None, head)
    assert det.predict_features(ood_feats).min() > det.predict_features(id_feats).max()
    with torch.no_grad():  # plain energy does not separate them
        assert EnergyBased.score(head(ood_feats)).min() < EnergyBased.score(head(id_feats)).max()


def test_roundtrip_and_custom_callable(tmp_path) -> None:
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    det = SCALE(None, head, percentile=0.9, detector="Entropy")
    loaded = assert_roundtrip(det, torch.rand(3, 4, 5, 5), tmp_path, backbone=None, head=head)
    assert loaded.hparams() == {"percentile": 0.9, "detector": "Entropy"}
    with pytest.raises(ValueError, match="SCALE cannot be saved"):
        save_detector(SCALE(None, head, detector=lambda logits: logits.sum(1)), tmp_path / "s.safetensors")
