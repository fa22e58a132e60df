from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import VRA, MaxLogit, vra
from ood_core.state import load_detector, save_detector
from tests.ood_core.state_helpers import resave, split_state

from .common import assert_roundtrip
from .shards import assert_shards_merge_to_stream
from .synthetic import DIM, maps_head, separable_maps


def head() -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    return layer


def test_thresholds_are_per_element_quantiles_and_activations_are_clipped() -> None:
    # element 0 takes 0..4, element 1 takes 10, 20, .., 50; the OOD row is ignored
    z = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0], [4.0, 50.0], [99.0, -99.0]])
    det = VRA(None, head(), lower_percentile=0.25, upper_percentile=0.75, detector=MaxLogit.score)
    det.fit_features(z, torch.tensor([0, 0, 1, 1, 0, -1]))
    torch.testing.assert_close(det.lower, torch.tensor([[1.0], [20.0]]))
    torch.testing.assert_close(det.upper, torch.tensor([[3.0], [40.0]]))
    x = torch.tensor([[10.0, 25.0], [-5.0, 0.0]])  # clipped to [3, 25] and [1, 20]
    torch.testing.assert_close(det.predict_features(x), torch.tensor([-25.0, -20.0]))


def test_interpolated_quantiles_match_torch_quantile_on_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    maps = torch.randn(37, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(vra, "QUANTILE_CHUNK_ELEMENTS", 50)  # several column chunks
    det = VRA(None, maps_head(), lower_percentile=0.1, upper_percentile=0.93).fit_features(maps, torch.zeros(37))
    flat = maps.reshape(37, 3, 4).double()
    torch.testing.assert_close(det.lower, torch.quantile(flat, 0.1, dim=0).float())
    torch.testing.assert_close(det.upper, torch.quantile(flat, 0.93, dim=0).float())


def test_ood_scores_higher_on_separable_maps() -> None:
    id_maps, y, ood_maps = separable_maps()
    det = VRA(None, maps_head()).fit_features(id_maps, y)
    assert det.predict_features(ood_maps).min() > det.predict_features(id_maps).max()


def test_requires_fit_and_validates_arguments() -> None:
    with pytest.raises(RequiresFitException):
        VRA(None, head()).predict_features(torch.rand(2, 2))
    with pytest.raises(ValueError, match="must not exceed"):
        VRA(None, head(), lower_percentile=0.9, upper_percentile=0.1)
    with pytest.raises(ValueError, match="no ID samples"):
        VRA(None, head()).fit_features(torch.rand(2, 2), torch.tensor([-1, -1]))
    det = VRA(None, maps_head()).fit_features(torch.rand(4, DIM, 2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="fitted on activations"):
        det.predict_features(torch.rand(4, DIM, 3, 3))
    assert not VRA.supports_segmentation


def test_sample_beyond_the_budget_is_a_subset_of_the_fit_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    z = torch.arange(100.0)[:, None].expand(100, 2).contiguous()
    monkeypatch.setattr(VRA, "max_fit_elements", 40)  # 20 maps of 2 elements
    det = VRA(None, head(), lower_percentile=0.0, upper_percentile=1.0).begin_fit()
    for i in range(0, 100, 10):
        det.partial_fit_features(z[i : i + 10], torch.zeros(10))
    assert det._sample is not None and det._sample.size <= 40
    assert det.finish_pass()
    assert 0.0 <= float(det.lower[0, 0]) < 20.0 and 80.0 < float(det.upper[0, 0]) <= 99.0


def test_roundtrip_and_crossed_thresholds_are_refused(tmp_path: Path) -> None:
    id_maps, y, ood_maps = separable_maps(16)
    det = VRA(nn.Identity(), maps_head(), 0.05, 0.9, detector="MaxLogit").fit(
        [(id_maps[:8], y[:8]), (id_maps[8:], y[8:])]
    )
    assert_roundtrip(det, ood_maps, tmp_path, backbone=nn.Identity(), head=maps_head())
    tensors, meta = split_state(save_detector(det))
    crossed = {"lower": tensors["upper"] + 1.0, "upper": tensors["upper"]}
    with pytest.raises(InvalidStateError, match="exceeds"):
        load_detector(resave(crossed, meta), head=maps_head())


def test_merged_shards_equal_one_stream() -> None:
    id_maps, y, ood_maps = separable_maps(48, seed=6)
    y[::5] = -1
    batches = [(id_maps[i : i + 4], y[i : i + 4]) for i in range(0, 48, 4)]
    assert_shards_merge_to_stream(lambda: VRA(None, maps_head(), 0.1, 0.9), batches, ood_maps, head=maps_head())
