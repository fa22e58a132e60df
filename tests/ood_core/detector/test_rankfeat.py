from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.detector import EnergyBased, MaxLogit, RankFeat

from .common import assert_roundtrip
from .synthetic import CLASSES, DIM, maps_head, separable_maps


def flat_head() -> nn.Sequential:
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return nn.Sequential(nn.Flatten(), layer)


def test_rank1_component_is_removed_by_hand() -> None:
    # sample 0 is rank 1: nothing is left; sample 1 = diag(3, 1): sigma_1 u_1 v_1^T = 3 e1 e1^T
    maps = torch.tensor([[[[1.0, 2.0]], [[2.0, 4.0]]], [[[3.0, 0.0]], [[0.0, 1.0]]]])  # B=2, C=2, H=1, W=2
    removed = RankFeat.remove_rank1(maps)
    torch.testing.assert_close(removed[0], torch.zeros(2, 1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(removed[1], torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]]]), atol=1e-6, rtol=0)
    # the head sees [0, 0, 0, 0] -> logits [0.5, -0.5], and [0, 0, 0, 1] -> [0.5, 0.5]
    det = RankFeat(None, flat_head(), detector=MaxLogit.score)
    torch.testing.assert_close(det.predict_features(maps), torch.tensor([-0.5, -0.5]), atol=1e-6, rtol=0)
    energy = RankFeat(None, flat_head())
    torch.testing.assert_close(
        energy.predict_features(maps), EnergyBased.score(torch.tensor([[0.5, -0.5], [0.5, 0.5]])), atol=1e-6, rtol=0
    )


def test_removal_equals_the_svd_definition_on_random_maps() -> None:
    maps = torch.randn(3, 5, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    removed = RankFeat.remove_rank1(maps)
    for sample, out in zip(maps, removed, strict=True):
        m = sample.reshape(5, 12)
        u, s, vh = torch.linalg.svd(m)
        torch.testing.assert_close(out.reshape(5, 12), m - s[0] * torch.outer(u[:, 0], vh[0]))
        assert torch.linalg.matrix_rank(out.reshape(5, 12)) == 4


def test_ood_scores_higher_on_separable_maps() -> None:
    id_maps, _, ood_maps = separable_maps()
    det = RankFeat(None, maps_head())
    assert det.predict_features(ood_maps).min() > det.predict_features(id_maps).max()


def test_segmentation_scores_per_pixel_with_a_convolutional_head() -> None:
    id_maps, _, _ = separable_maps(3)
    head = nn.Conv2d(DIM, CLASSES, kernel_size=1)
    det = RankFeat(None, head)
    scores = det.predict_features(id_maps)
    assert RankFeat.supports_segmentation and scores.shape == (3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(scores, EnergyBased.score(head(RankFeat.remove_rank1(id_maps))))


def test_needs_no_fit_refuses_pooled_features_and_roundtrips(tmp_path: Path) -> None:
    det = RankFeat(nn.Identity(), maps_head(), detector="Entropy")
    assert det.fit_features(torch.rand(2, DIM, 2, 2), torch.zeros(2)).is_fitted
    with pytest.raises(ValueError, match="feature maps"):
        det.predict_features(torch.rand(2, DIM))
    maps = torch.rand(4, DIM, 3, 3)
    loaded = assert_roundtrip(det, maps, tmp_path, backbone=nn.Identity(), head=maps_head())
    assert loaded.hparams() == {"detector": "Entropy"}
    torch.testing.assert_close(det.predict(maps), det.predict_features(maps))  # predict runs the backbone
