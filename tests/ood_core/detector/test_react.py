from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.detector import EnergyBased, ReAct
from ood_core.detector.react import RadixQuantile, order_keys
from ood_core.state import save_detector

from .common import assert_roundtrip


def test_rectify_on_hand_computed_vector() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(ReAct.rectify(x, 2.5), torch.tensor([[1.0, 2.0, 2.5, 2.5]]))


def test_fixed_threshold_needs_no_fit_and_predict_clips_before_the_head() -> None:
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(3, 6), nn.ReLU()), nn.Linear(6, 4)
    det = ReAct(backbone, head, threshold=0.3)
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = EnergyBased.score(head(backbone(x).clamp(max=0.3)))
    torch.testing.assert_close(det(x), expected)
    assert det.fit_features(torch.full((4, 6), 100.0), torch.zeros(4)) is det  # no-op
    assert float(det.threshold) == pytest.approx(0.3)


def test_seed_order_and_default_threshold_need_no_fit() -> None:
    head = nn.Linear(4, 2)
    det = ReAct(None, head, 1.0, EnergyBased.score)  # the seed's positional call
    assert det.is_fitted and float(det.threshold) == 1.0 and det.fit_passes == 0
    assert ReAct(None, head).hparams()["threshold"] == 1.0
    z = torch.rand(3, 4) * 3
    torch.testing.assert_close(det.predict_features(z), EnergyBased.score(head(z.clamp(max=1.0))))
    with pytest.raises(ValueError, match="not both"):
        ReAct(None, head, threshold=2.0, percentile=0.9)
    assert not ReAct(None, head, percentile=0.8).is_fitted  # percentile alone: a fitted threshold


def test_percentile_threshold_requires_fit() -> None:
    det = ReAct(None, nn.Linear(4, 2), threshold=None)
    with pytest.raises(RequiresFitException):
        det.predict_features(torch.rand(2, 4))


def test_fitted_threshold_is_the_percentile_of_id_activations() -> None:
    # ID activations 0..11 (12 values), 0.9 quantile with linear interpolation: 0.9 * 11 = 9.9
    z = torch.arange(12.0).reshape(3, 4)
    ood = torch.full((1, 4), 1000.0)
    det = ReAct(None, nn.Linear(4, 2), percentile=0.9)
    det.fit_features(torch.cat([z, ood]), torch.tensor([0, 1, 0, -1]))
    assert float(det.threshold) == pytest.approx(9.9)


def test_fit_streams_over_the_loader_like_fit_features_on_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 2, 3, 3, generator=g)
    labels = torch.randint(-1, 3, (40,), generator=g)
    head = nn.Conv2d(2, 3, 1)
    streamed = ReAct(nn.Identity(), head, percentile=0.8)
    streamed.fit([(maps[i : i + 8], labels[i : i + 8]) for i in range(0, 40, 8)])
    whole = ReAct(None, head, percentile=0.8).fit_features(maps, labels)
    assert float(streamed.threshold) == float(whole.threshold)
    expected = torch.quantile(maps[labels >= 0].reshape(-1), 0.8)
    assert float(whole.threshold) == pytest.approx(float(expected))


def test_radix_quantile_is_exact_for_any_floats_in_two_passes() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.cat([1e3 * torch.randn(5_000, generator=g), torch.zeros(300), torch.tensor([3e38, -3e38, 1e-40])])
    keys = torch.sort(order_keys(values)).values  # key order is value order (negatives, subnormals, extremes)
    decoded = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)
    assert bool((decoded[1:] >= decoded[:-1]).all())
    for q in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        radix = RadixQuantile(q)
        high = torch.stack([radix.high_histogram(part) for part in values.split(999)]).sum(0)  # merged: added
        bins = radix.targets(high)[0]
        low = torch.stack([radix.low_histogram(part, bins) for part in values.split(999)]).sum(0)
        assert radix.quantile(high, low) == float(torch.quantile(values.double(), q))
    with pytest.raises(ValueError, match="second pass"):
        radix.quantile(high, low * 2)


def test_ood_spikes_are_clipped_so_ood_scores_higher() -> None:
    # ID: class c has activations ~1 on its 4 units; OOD: two huge spikes, which plain energy finds
    # more "confident" than any ID sample
    head = nn.Linear(8, 2, bias=False)
    head.weight.data = 2.0 * torch.repeat_interleave(torch.eye(2), 4, dim=1)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=g)
    id_feats = 0.1 * torch.rand(64, 8, generator=g)
    id_feats += torch.repeat_interleave(nn.functional.one_hot(y, 2).float(), 4, dim=1)
    ood_feats = torch.zeros(16, 8)
    ood_feats[:, 0] = ood_feats[:, 4] = 20.0
    det = ReAct(None, head, threshold=None).fit_features(id_feats, y)
    assert det.predict_features(ood_feats).min() > det.predict_features(id_feats).max()
    with torch.no_grad():
        assert EnergyBased.score(head(ood_feats)).max() < EnergyBased.score(head(id_feats)).min()


def test_segmentation_with_fully_convolutional_head() -> None:
    det = ReAct(None, nn.Conv2d(4, 3, 1), threshold=0.5)
    assert det.predict_feature_maps(torch.rand(2, 4, 5, 7)).shape == (2, 5, 7)


@pytest.mark.parametrize("threshold", [None, 0.7])
def test_roundtrip(tmp_path: Path, threshold: float | None) -> None:
    backbone, head = nn.Identity(), nn.Conv2d(4, 3, 1)
    det = ReAct(backbone, head, threshold=threshold) if threshold else ReAct(backbone, head, percentile=0.75)
    det.fit_features(torch.rand(6, 4, 3, 3), torch.zeros(6, dtype=torch.long))
    loaded = assert_roundtrip(det, torch.rand(2, 4, 3, 3), tmp_path, backbone=backbone, head=head)
    assert isinstance(loaded, ReAct)
    assert float(loaded.threshold) == float(det.threshold)
    percentile = None if threshold else 0.75
    assert loaded.hparams() == {"threshold": threshold, "percentile": percentile, "detector": "EnergyBased"}


def test_validation_and_custom_callable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ReAct(None, None, percentile=90)
    with pytest.raises(ValueError, match="one label per sample"):
        ReAct(None, None, threshold=None).fit_features(torch.rand(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no ID activations"):
        ReAct(None, None, threshold=None).fit_features(torch.rand(2, 3), torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ReAct(None, None, threshold=None).fit_features(torch.tensor([[1.0, float("nan")]]), torch.tensor([0]))
    det = ReAct(None, nn.Linear(3, 2), threshold=1.0, detector=lambda logits: logits.sum(1))
    with pytest.raises(ValueError, match="ReAct cannot be saved"):
        save_detector(det, tmp_path / "r.safetensors")
