import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import GMM
from ood_core.state import load_detector, save_detector
from tests.ood_core.state_helpers import resave, split_state

from .common import assert_roundtrip
from .shards import assert_shards_merge_to_stream
from .synthetic import separable_features


def normal_pdf(x: float, mean: float, var: float) -> float:
    return math.exp(-((x - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def test_one_dimensional_mixture_by_hand() -> None:
    # class 0: {0, 2} -> mean 1, variance 1; class 1: {9, 11, 10, 10} -> mean 10, variance 0.5; weights 1/3, 2/3
    z = torch.tensor([[0.0], [2.0], [9.0], [11.0], [10.0], [10.0], [99.0]])
    det = GMM(None, reg=0.0).fit_features(z, torch.tensor([0, 0, 1, 1, 1, 1, -1]))
    x = [1.0, 5.0, 10.5]
    want = [-math.log(normal_pdf(v, 1.0, 1.0) / 3 + 2 * normal_pdf(v, 10.0, 0.5) / 3) for v in x]
    torch.testing.assert_close(det.predict_features(torch.tensor(x)[:, None]), torch.tensor(want))


def test_per_class_covariances_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, generator=g) * torch.tensor([0.5, 2.0, 1.0])
    b = torch.randn(20, 3, generator=g) @ torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.4]]) + 4.0
    z, y = torch.cat([a, b]).double(), torch.cat([torch.zeros(40), torch.ones(20)]).long()
    det = GMM(None, reg=1e-3).fit_features(z, y)
    parts = []
    for c, weight in ((0, 40 / 60), (1, 20 / 60)):
        zc = z[y == c]
        cov = (zc - zc.mean(0)).T @ (zc - zc.mean(0)) / len(zc) + 1e-3 * torch.eye(3, dtype=torch.float64)
        parts.append(MultivariateNormal(zc.mean(0), cov).log_prob(z) + math.log(weight))
    want = -torch.logsumexp(torch.stack(parts, 1), 1)
    torch.testing.assert_close(det.predict_features(z), want, rtol=1e-10, atol=1e-10)


def test_ood_scores_higher_on_separable_features_and_maps_are_pooled() -> None:
    id_z, y, ood_z = separable_features()
    det = GMM(None, reg=1e-4).fit_features(id_z, y)
    assert det.predict_features(ood_z).min() > det.predict_features(id_z).max()
    maps = id_z[:, :, None, None].expand(-1, -1, 2, 3)
    torch.testing.assert_close(det.predict_features(maps), det.predict_features(id_z))


def test_requires_fit_and_a_positive_definite_covariance() -> None:
    with pytest.raises(RequiresFitException):
        GMM(None).predict_features(torch.rand(2, 3))
    with pytest.raises(ValueError, match="increase reg"):
        GMM(None, reg=0.0).fit_features(torch.rand(2, 3), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="no ID samples"):
        GMM(None).fit_features(torch.rand(2, 3), torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="reg"):
        GMM(None, reg=-1.0)


def test_absent_labels_get_no_component() -> None:
    z = torch.tensor([[0.0], [2.0], [9.0], [11.0]])
    det = GMM(None, reg=0.0).fit_features(z, torch.tensor([0, 0, 3, 3]))
    assert det.mu.shape == (2, 1) and torch.allclose(
        det.log_weights.exp(), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )


def test_roundtrip_and_tampered_states_are_refused(tmp_path: Path) -> None:
    id_z, y, ood_z = separable_features(64)
    det = GMM(nn.Identity(), reg=1e-3).fit([(id_z[:32], y[:32]), (id_z[32:], y[32:])])
    assert_roundtrip(det, ood_z, tmp_path)
    tensors, meta = split_state(save_detector(det))
    lower = {**tensors, "precision_factor": tensors["precision_factor"].transpose(1, 2).contiguous()}
    with pytest.raises(InvalidStateError, match="upper-triangular"):
        load_detector(resave(lower, meta))
    negative = {**tensors, "precision_factor": -tensors["precision_factor"]}
    with pytest.raises(InvalidStateError, match="positive diagonal"):
        load_detector(resave(negative, meta))
    weights = {**tensors, "log_weights": tensors["log_weights"] + 1.0}
    with pytest.raises(InvalidStateError, match="summing to 1"):
        load_detector(resave(weights, meta))


def test_merged_shards_equal_one_stream() -> None:
    id_z, y, ood_z = separable_features(96, seed=3)
    id_z = id_z.double() + 100.0  # far from the origin: the centred moments must not cancel
    y[::11] = -1
    batches = [(id_z[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)]
    assert_shards_merge_to_stream(lambda: GMM(None, reg=1e-3), batches, ood_z.double() + 100.0, tol=1e-8)
