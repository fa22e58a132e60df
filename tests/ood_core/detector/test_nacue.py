from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.detector import NACUE
from ood_core.detector.nacue import geometric_bins
from ood_core.fit_checkpoint import load_fit_checkpoint, save_fit_checkpoint
from ood_core.state import load_detector, save_detector

from .synthetic import DIM, block_head, separable_features, separable_maps


def identity_then_linear() -> nn.Sequential:
    """x -> x (the hooked layer) -> I x: logits = x, so dKL/dz = softmax(x) - 1/2 for 2 classes."""
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    return nn.Sequential(nn.Identity(), linear)


def test_geometric_bins() -> None:
    # m = 2: edges 1e-6, 0.5, 1 - 1e-6: bin 0 up to 0.5, bin 1 above; m = 4: 1e-6, ~7e-4, 0.5, 1 - 7e-4, 1 - 1e-6
    states = torch.tensor([0.0, 0.1, 0.4999, 0.5001, 1.0])
    assert geometric_bins(states, 2).tolist() == [0, 0, 0, 1, 1]
    assert geometric_bins(torch.tensor([1e-4, 1e-3, 0.4, 0.6, 0.9999]), 4).tolist() == [0, 1, 1, 2, 3]


def test_coverage_on_a_hand_computed_case() -> None:
    model = identity_then_linear()
    det = NACUE(model, [model[0]], m_bins=2, o_star=2)
    # state_i = sigmoid(100 x_i (p_i - 1/2)): bin 1 iff x_i (p_i - 1/2) > 0, with p = softmax(x)
    # (2, -1): bins (1, 1); (1, 3): bins (0, 1); (-1, -2): bins (0, 1) -> neuron 0 counts [2, 1], neuron 1 [0, 3]
    fit = torch.tensor([[2.0, -1.0], [1.0, 3.0], [-1.0, -2.0], [5.0, 5.0]])
    det.fit([(fit, torch.tensor([0, 0, 0, -1]))])  # the row labelled OOD is left out
    assert det.counts[0].tolist() == [[2, 1], [0, 3]] and det.layer_dims.tolist() == [2]
    x = torch.tensor([[2.0, -1.0], [1.0, 3.0], [3.0, 1.0]])
    # coverage min(count / 2, 1) averaged over the neurons: (1/2 + 1) / 2, (1 + 1) / 2, (1/2 + 0) / 2
    torch.testing.assert_close(det.predict(x), torch.tensor([-0.75, -1.0, -0.25]))
    # layer lists add up; per-layer hyperparameters
    two = NACUE(model, [model[0], model[1]], m_bins=[2, 2], alpha=[100.0, 100.0], o_star=[2, 2]).fit([fit[:3]])
    assert two.counts.shape == (2, 2, 2) and two.counts[0].tolist() == [[2, 1], [0, 3]]


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, _, ood_z = separable_features(1024)
    model = nn.Sequential(nn.Identity(), block_head())
    det = NACUE(model, [model[0]], m_bins=10, alpha=1.0, o_star=5).fit([id_z[:768]])  # plain input batches: all ID
    assert det.predict(id_z[768:]).max() < det.predict(ood_z).min()


def test_feature_maps_count_one_neuron_per_channel() -> None:
    id_maps, y, _ = separable_maps(32)
    conv = nn.Sequential(nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), block_head())
    det = NACUE(conv, [conv[0]], m_bins=10).fit([(id_maps, y)])
    assert det.counts.shape == (1, DIM, 10) and det.counts.sum() == 32 * DIM
    assert det.predict(id_maps[:5]).shape == (5,)


def test_needs_a_fit_and_the_layers() -> None:
    model = identity_then_linear()
    with pytest.raises(RequiresFitException):
        NACUE(model, [model[0]]).predict(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="o_star"):
        NACUE(model, [model[0]], o_star=[1, 2])
    with pytest.raises(ValueError, match="m_bins"):
        NACUE(model, [model[0]], m_bins=0)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = identity_then_linear()
    fit = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    det = NACUE(model, [model[0], model[1]], m_bins=[6, 4], alpha=10.0, o_star=3).fit([fit])
    assert det.counts.shape == (2, 2, 6) and not det.counts[1, :, 4:].any()
    save_detector(det, tmp_path / "n.safetensors")
    other = identity_then_linear()
    loaded = load_detector(tmp_path / "n.safetensors", model=other, layers=[other[0], other[1]])
    assert loaded.hparams() == det.hparams()
    x = torch.randn(9, 2)
    torch.testing.assert_close(loaded.predict(x), det.predict(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layers"):
        load_detector(tmp_path / "n.safetensors", model=other, layers=[other[0]])
    with pytest.raises(ValueError, match="JSON"):
        save_detector(NACUE(model, [model[0]], feature_reduce=lambda z: z).fit([fit]))


def test_shards_merge_and_a_resumed_fit_equal_one_stream() -> None:
    model = identity_then_linear()
    batches = [torch.randn(16, 2, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    make = lambda: NACUE(model, [model[0], model[1]], m_bins=8)  # noqa: E731
    stream = make().fit(batches)
    stats = []
    for shard in (batches[0::3], batches[1::3], batches[2::3]):
        stats.append(load(save(make().partial_fit(shard).fit_statistics())))
    merged = make().begin_fit()
    for part in reversed(stats):
        merged.merge_fit_statistics(part)
    assert merged.finish_pass()
    resumed, _ = load_fit_checkpoint(
        save_fit_checkpoint(make().partial_fit(batches[:3])), model=model, layers=[model[0], model[1]]
    )
    assert resumed.partial_fit(batches[3:]).finish_pass()
    x = torch.randn(10, 2)
    for other in (merged, resumed):
        assert isinstance(other, NACUE)
        assert torch.equal(other.counts, stream.counts) and torch.equal(other.layer_dims, stream.layer_dims)
        torch.testing.assert_close(other.predict(x), stream.predict(x))
