import pytest
import torch
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.detector import DICE, EnergyBased, MaxLogit
from ood_core.state import save_detector

from .common import assert_roundtrip

W = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
B = torch.tensor([0.5, 0.0])


def test_mask_keeps_top_contributions_and_scores_the_masked_layer() -> None:
    # mean feature [2, 2]; contributions [[2, 4], [6, -2]]; p = 0.5 keeps the top 2: 6 and 4
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [50.0, -50.0]])
    det = DICE(None, W, B, p=0.5).fit_features(z, torch.tensor([0, 1, -1]))  # the OOD row is ignored
    assert det.mask.tolist() == [[False, True], [True, False]]
    # masked layer [[0, 2], [3, 0]]: x = [1, 1] -> logits [2.5, 3]
    expected = EnergyBased.score(torch.tensor([[2.5, 3.0]]))
    torch.testing.assert_close(det.predict_features(torch.tensor([[1.0, 1.0]])), expected)


def test_p_zero_keeps_the_layer_and_p_one_leaves_the_bias() -> None:
    z = torch.rand(5, 2)
    x = torch.randn(4, 2)
    full = DICE(None, W, B, p=0.0, detector=MaxLogit.score).fit_features(z, torch.zeros(5))
    torch.testing.assert_close(full.predict_features(x), MaxLogit.score(x @ W.T + B))
    empty = DICE(None, W, B, p=1.0, detector="MaxLogit").fit_features(z, torch.zeros(5))
    torch.testing.assert_close(empty.predict_features(x), MaxLogit.score(B.expand(4, 2)))


def test_requires_fit_and_validates_arguments() -> None:
    with pytest.raises(RequiresFitException):
        DICE(None, W, B, p=0.5).predict_features(torch.rand(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DICE(None, W, B, p=90)
    with pytest.raises(ValueError, match="C x D"):
        DICE(None, W, torch.zeros(3), p=0.5)
    with pytest.raises(ValueError, match="no ID samples"):
        DICE(None, W, B, p=0.5).fit_features(torch.rand(2, 2), torch.tensor([-1, -1]))


def test_fit_streams_like_fit_features_on_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    z, y = torch.rand(50, 6, generator=g), torch.randint(-1, 4, (50,), generator=g)
    streamed = DICE(nn.Identity(), w, b, p=0.7).fit([(z[i : i + 5], y[i : i + 5]) for i in range(0, 50, 5)])
    whole = DICE(None, w, b, p=0.7).fit_features(z, y)
    assert torch.equal(streamed.mask, whole.mask)
    assert int(whole.mask.sum()) == 24 - round(24 * 0.7)


def test_ood_scores_higher_on_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    classes, dim = 4, 16
    w = torch.repeat_interleave(torch.eye(classes), dim // classes, dim=1) + 0.3 * torch.randn(
        classes, dim, generator=g
    )
    y = torch.randint(0, classes, (64,), generator=g)
    id_feats = 2.0 * torch.repeat_interleave(nn.functional.one_hot(y, classes).float(), dim // classes, dim=1)
    id_feats += 0.2 * torch.rand(64, dim, generator=g)
    ood_feats = 0.5 * torch.rand(64, dim, generator=g)
    det = DICE(None, w, torch.zeros(classes), p=0.7).fit_features(id_feats, y)
    assert det.predict_features(ood_feats).min() > det.predict_features(id_feats).max()


def test_roundtrip_and_custom_callable(tmp_path) -> None:
    model = nn.Identity()
    det = DICE(model, W, B, p=0.25, detector="GEN").fit_features(torch.rand(8, 2), torch.zeros(8))
    loaded = assert_roundtrip(det, torch.randn(5, 2), tmp_path, model=model)
    assert loaded.hparams() == {"p": 0.25, "detector": "GEN"}
    for name in ("w", "b", "mask"):
        assert torch.equal(getattr(loaded, name), getattr(det, name))
    custom = DICE(None, W, B, p=0.5, detector=lambda logits: logits.sum(1)).fit_features(
        torch.rand(3, 2), torch.zeros(3)
    )
    with pytest.raises(ValueError, match="DICE cannot be saved"):
        save_detector(custom, tmp_path / "d.safetensors")
