import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import NNGuide, nnguide
from ood_core.state import load_detector, save_detector
from tests.ood_core.state_helpers import resave, split_state

from .common import assert_roundtrip
from .shards import assert_shards_merge_to_stream
from .synthetic import block_head, separable_features


def identity_head() -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    return layer


def energy(*logits: float) -> float:
    return math.log(sum(math.exp(v) for v in logits))


def test_bank_holds_energy_scaled_unit_features_and_the_score_is_guided_energy() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    det = NNGuide(None, identity_head(), k=1).fit_features(z, torch.tensor([0, 1, -1]))
    e1, e2 = energy(1.0, 0.0), energy(0.0, 2.0)
    torch.testing.assert_close(det.bank, torch.tensor([[e1, 0.0], [0.0, e2]]))
    # x = [3, 4]: unit [0.6, 0.8]; inner products 0.6 e1 and 0.8 e2; the largest (k=1) guides E(x)
    want = -max(0.6 * e1, 0.8 * e2) * energy(3.0, 4.0)
    torch.testing.assert_close(det.predict_features(torch.tensor([[3.0, 4.0]])), torch.tensor([want]))
    both = NNGuide(None, identity_head(), k=2).fit_features(z[:2])
    want2 = -(0.6 * e1 + 0.8 * e2) / 2 * energy(3.0, 4.0)
    torch.testing.assert_close(both.predict_features(torch.tensor([[3.0, 4.0]])), torch.tensor([want2]))


def test_blocked_search_equals_the_plain_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    want = (queries @ bank.T).topk(7, dim=1).values.mean(1)
    monkeypatch.setattr(nnguide, "MAX_BLOCK_ELEMENTS", 1000)  # several query blocks and bank chunks
    torch.testing.assert_close(nnguide.top_k_mean(queries, bank, 7), want)


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, y, ood_z = separable_features()
    det = NNGuide(None, block_head(), k=5).fit_features(id_z, y)
    assert det.predict_features(ood_z).min() > det.predict_features(id_z).max()


def test_requires_fit_and_k_samples() -> None:
    with pytest.raises(RequiresFitException):
        NNGuide(None, identity_head()).predict_features(torch.rand(2, 2))
    with pytest.raises(ValueError, match="at least k=10"):
        NNGuide(None, identity_head()).fit_features(torch.rand(9, 2), torch.zeros(9))
    with pytest.raises(ValueError, match="positive integer"):
        NNGuide(None, identity_head(), k=0)


def test_roundtrip_and_a_bank_smaller_than_k_is_refused(tmp_path: Path) -> None:
    id_z, y, ood_z = separable_features(40)
    det = NNGuide(nn.Identity(), block_head(), k=3).fit([(id_z[:20], y[:20]), (id_z[20:], y[20:])])
    assert_roundtrip(det, ood_z, tmp_path, head=block_head())
    tensors, meta = split_state(save_detector(det))
    small = {**tensors, "bank": tensors["bank"][:2].clone()}
    with pytest.raises(InvalidStateError, match="fewer than k=3"):
        load_detector(resave(small, meta), head=block_head())


def test_merged_shards_equal_one_stream() -> None:
    id_z, y, ood_z = separable_features(60, seed=4)
    y[::5] = -1
    batches = [(id_z[i : i + 6], y[i : i + 6]) for i in range(0, 60, 6)]
    merged = assert_shards_merge_to_stream(lambda: NNGuide(None, block_head(), k=4), batches, ood_z, head=block_head())
    assert isinstance(merged, NNGuide) and merged.bank.shape[0] == int((y >= 0).sum())
