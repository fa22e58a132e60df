import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ood_core.api import InvalidStateError, ModelNotSetException
from ood_core.detector import ASH, EnergyBased, MaxLogit
from ood_core.state import load_detector, save_detector

from .common import assert_roundtrip


def pooled_head(channels: int = 4, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def conv_backbone(channels: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())


def test_variants_on_hand_computed_vector() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # n = 4, p = 0.5: k = 2 kept (3 and 4); s1 = 10, s2 = 7
    torch.testing.assert_close(ASH.ash_p(x, 0.5), torch.tensor([[0.0, 0.0, 3.0, 4.0]]))
    torch.testing.assert_close(ASH.ash_b(x, 0.5), torch.tensor([[0.0, 0.0, 5.0, 5.0]]))
    torch.testing.assert_close(ASH.ash_s(x, 0.5), torch.tensor([[0.0, 0.0, 3.0, 4.0]]) * math.exp(10 / 7))


def test_feature_maps_are_shaped_per_sample_over_flattened_channels_and_pixels() -> None:
    maps = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[4.0, 0.0]], [[1.0, 2.0]]]])  # 2 x 2 x 1 x 2
    # sample 1 flattened = [4, 0, 1, 2]: keeps 4 and 2; s1 = 7, s2 = 6
    expected_p = torch.tensor([[[[0.0, 0.0]], [[3.0, 4.0]]], [[[4.0, 0.0]], [[0.0, 2.0]]]])
    expected_b = torch.tensor([[[[0.0, 0.0]], [[5.0, 5.0]]], [[[3.5, 0.0]], [[0.0, 3.5]]]])
    factor = torch.tensor([math.exp(10 / 7), math.exp(7 / 6)]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(ASH.ash_p(maps, 0.5), expected_p)
    torch.testing.assert_close(ASH.ash_b(maps, 0.5), expected_b)
    torch.testing.assert_close(ASH.ash_s(maps, 0.5), expected_p * factor)


def test_kept_count_rounds_half_to_even_like_the_reference_code() -> None:
    x = torch.arange(1.0, 11.0)[None]  # n = 10, p = 0.65: round(6.5) = 6 pruned -> 4 kept
    assert int((ASH.ash_p(x, 0.65) != 0).sum()) == 4
    # no pruning at p = 0: ASH-P is the identity and ASH-S scales by exp(1)
    torch.testing.assert_close(ASH.ash_p(x, 0.0), x)
    torch.testing.assert_close(ASH.ash_s(x, 0.0), x * math.e)
    # p = 1 still keeps the largest activation instead of dividing by zero
    torch.testing.assert_close(ASH.ash_b(x, 1.0), torch.cat([torch.zeros(1, 9), torch.tensor([[55.0]])], dim=1))


def test_input_is_not_modified_and_all_zero_samples_stay_finite() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    copy = x.clone()
    for shaping in (ASH.ash_p, ASH.ash_b, ASH.ash_s):
        out = shaping(x, 0.5)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1], torch.zeros(4))
    torch.testing.assert_close(x, copy)


@pytest.mark.parametrize("bad", [65, -0.1, 1.5, float("nan")])
def test_percentile_must_be_a_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ASH(None, None, percentile=bad)


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(ValueError, match="ash-s"):
        ASH(None, None, variant="ash-x")


@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
def test_predict_is_energy_of_head_on_shaped_backbone_output(variant: str) -> None:
    backbone, head = conv_backbone(), pooled_head()
    x = torch.randn(5, 3, 6, 6)
    det = ASH(backbone, head, variant=variant, percentile=0.7)
    shaping = {"ash-p": ASH.ash_p, "ash-b": ASH.ash_b, "ash-s": ASH.ash_s}[variant]
    with torch.no_grad():
        maps = backbone(x)
        expected = EnergyBased.score(head(shaping(maps, 0.7)))
    torch.testing.assert_close(det(x), expected)
    torch.testing.assert_close(det.predict_feature_maps(maps), expected)
    torch.testing.assert_close(det.predict_features(maps), expected)
    assert not list(det.parameters())  # networks are not submodules


def test_other_score_function_by_callable_or_name() -> None:
    head = pooled_head()
    maps = torch.rand(4, 4, 3, 3)
    with torch.no_grad():
        expected = MaxLogit.score(head(ASH.ash_s(maps, 0.65)))
    torch.testing.assert_close(ASH(None, head, detector=MaxLogit.score).predict_features(maps), expected)
    torch.testing.assert_close(ASH(None, head, detector="MaxLogit").predict_features(maps), expected)


def test_segmentation_with_fully_convolutional_head() -> None:
    head = nn.Conv2d(4, 3, kernel_size=1)
    maps = torch.rand(2, 4, 5, 7)
    scores = ASH(None, head, percentile=0.5).predict_feature_maps(maps)
    assert scores.shape == (2, 5, 7)
    # shaping is per sample: the second sample does not change the first one's scores
    torch.testing.assert_close(ASH(None, head, percentile=0.5).predict_feature_maps(maps[:1]), scores[:1])


def test_ood_scores_higher_on_synthetic_activations() -> None:
    # class c reads units 4c..4c+3; ID activations are strong on one class's units, OOD weak and spread
    classes, width = 5, 4
    head = nn.Linear(classes * width, classes, bias=False)
    head.weight.data = torch.repeat_interleave(torch.eye(classes), width, dim=1)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (32,), generator=g)
    id_feats = 0.1 * torch.rand(32, classes * width, generator=g)
    id_feats += 3.0 * torch.repeat_interleave(nn.functional.one_hot(y, classes).float(), width, dim=1)
    ood_feats = 0.5 * torch.rand(32, classes * width, generator=g)
    for variant in ASH.variants:
        det = ASH(None, head, variant=variant, percentile=0.65)
        assert det.predict_features(ood_feats).min() > det.predict_features(id_feats).max()


def test_missing_head_raises() -> None:
    with pytest.raises(ModelNotSetException):
        ASH(conv_backbone(), None).predict(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
def test_roundtrip(tmp_path, variant: str) -> None:
    backbone, head = conv_backbone(), pooled_head()
    det = ASH(backbone, head, variant=variant, percentile=0.8, detector="MaxLogit")
    loaded = assert_roundtrip(det, torch.rand(3, 4, 5, 5), tmp_path, backbone=backbone, head=head)
    assert loaded.hparams() == {"variant": variant, "percentile": 0.8, "detector": "MaxLogit"}
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(loaded(x), det(x), rtol=0, atol=0)


def test_saving_with_custom_score_callable_fails_clearly(tmp_path) -> None:
    det = ASH(None, pooled_head(), detector=lambda logits: -logits.amax(dim=1))
    with pytest.raises(ValueError, match="ASH cannot be saved"):
        save_detector(det, tmp_path / "ash.safetensors")
    assert not (tmp_path / "ash.safetensors").exists()


@pytest.mark.parametrize("bad", [{"detector": "NoSuchScore"}, {"percentile": 65}, {"variant": "ash-x"}])
def test_loading_bad_hyperparameters_is_an_invalid_state(tmp_path, bad: dict) -> None:
    path = tmp_path / "ash.safetensors"
    save_detector(ASH(None, pooled_head()), path)
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    metadata["hparams"] = json.dumps({**json.loads(metadata["hparams"]), **bad})
    save_file({}, str(path), metadata=metadata)
    with pytest.raises(InvalidStateError):
        load_detector(path, head=pooled_head())
