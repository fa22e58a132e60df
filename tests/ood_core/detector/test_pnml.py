import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import PNML
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


def regret(probs: list[float], kappa: float) -> float:
    total = sum(p / (p + (1 - p) * p**kappa) for p in probs)
    return math.log(total) / math.log(len(probs))


def test_regret_by_hand() -> None:
    # normalized fit features e1, e2 (the OOD row is ignored): X^T X = I, so P = I
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    det = PNML(None, identity_head()).fit_features(z, torch.tensor([0, 1, -1]))
    torch.testing.assert_close(det.projector, torch.eye(2, dtype=torch.float64))
    # x = [3, 4] -> z = [0.6, 0.8]: z^T P z = 1, kappa = 1/2; the head sees z: p = softmax([0.6, 0.8])
    p1 = 1 / (1 + math.exp(0.2))
    want = regret([p1, 1 - p1], 0.5)
    torch.testing.assert_close(det.predict_features(torch.tensor([[3.0, 4.0]])), torch.tensor([want]))


def test_projector_is_the_pseudo_inverse_of_the_gram_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 5, generator=g, dtype=torch.float64)
    x = nn.functional.normalize(z, dim=1)
    det = PNML(None, nn.Linear(5, 3)).fit_features(z)
    torch.testing.assert_close(det.projector, torch.linalg.pinv(x.T @ x), rtol=1e-9, atol=1e-9)
    single = PNML(None, nn.Linear(5, 3)).fit_features(z.float())  # float32 features: products in float64 too
    want = torch.linalg.pinv(
        nn.functional.normalize(z.float().double(), dim=1).T @ nn.functional.normalize(z.float().double(), dim=1)
    )
    torch.testing.assert_close(single.projector, want, rtol=1e-9, atol=1e-9)


def test_ood_scores_higher_on_separable_features_and_regret_is_in_unit_interval() -> None:
    id_z, y, ood_z = separable_features()
    det = PNML(None, block_head()).fit_features(id_z, y)
    id_s, ood_s = det.predict_features(id_z), det.predict_features(ood_z)
    assert ood_s.min() > id_s.max()
    assert float(torch.cat([id_s, ood_s]).min()) >= 0.0 and float(torch.cat([id_s, ood_s]).max()) <= 1.0


def test_requires_fit_and_validates_arguments() -> None:
    with pytest.raises(RequiresFitException):
        PNML(None, identity_head()).predict_features(torch.rand(2, 2))
    with pytest.raises(ValueError, match="eps"):
        PNML(None, identity_head(), eps=0.7)
    with pytest.raises(ValueError, match="no ID samples"):
        PNML(None, identity_head()).fit_features(torch.rand(3, 2), torch.tensor([-1, -1, -1]))


def test_roundtrip_and_an_indefinite_projector_is_refused(tmp_path: Path) -> None:
    id_z, y, ood_z = separable_features(40)
    det = PNML(nn.Identity(), block_head(), eps=1e-9).fit([(id_z, y)])
    assert_roundtrip(det, ood_z, tmp_path, head=block_head())
    tensors, meta = split_state(save_detector(det))
    with pytest.raises(InvalidStateError, match="positive semi-definite"):
        load_detector(resave({"projector": -tensors["projector"]}, meta), head=block_head())


def test_merged_shards_equal_one_stream() -> None:
    id_z, y, ood_z = separable_features(60, seed=5)
    batches = [(id_z[i : i + 4], y[i : i + 4]) for i in range(0, 60, 4)]
    assert_shards_merge_to_stream(lambda: PNML(None, block_head()), batches, ood_z, tol=1e-5, head=block_head())
