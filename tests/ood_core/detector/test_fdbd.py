import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import fDBD
from ood_core.state import load_detector, save_detector
from tests.ood_core.state_helpers import resave, split_state

from .common import assert_roundtrip
from .shards import assert_shards_merge_to_stream
from .synthetic import block_head, separable_features


def linear(weight: list[list[float]], bias: list[float] | None = None) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


HEAD = linear([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_score_is_the_mean_relative_distance_to_the_decision_boundaries() -> None:
    det = fDBD(None, HEAD).fit_features(torch.tensor([[1.0, 1.0], [3.0, 1.0], [50.0, 50.0]]), torch.tensor([0, 1, -1]))
    assert det.train_mean.tolist() == [2.0, 1.0]  # the OOD row is left out
    # z = [2, 3]: logits [2, 3, -2], predicted class 1; boundaries to class 0: |3 - 2| / |w1 - w0| = 1 / sqrt 2,
    # to class 2: |3 + 2| / |w1 - w2| = 5 / sqrt 2; ||z - mu|| = 2; mean over C - 1 = 2 boundaries
    expected = -(6 / math.sqrt(2)) / (2 * 2)
    torch.testing.assert_close(det.predict_features(torch.tensor([[2.0, 3.0]])), torch.tensor([expected]))


def test_bias_shifts_the_boundaries_and_labels_may_be_left_out() -> None:
    head = linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 1.0])
    det = fDBD(None, head).fit_features(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))  # pytorch-ood's fit_features(z)
    # z = [4, 0]: logits [4, 1] -> predicted 0, |4 - 1| / sqrt 2, ||z - [1, 0]|| = 3
    torch.testing.assert_close(det.predict_features(torch.tensor([[4.0, 0.0]])), torch.tensor([-1 / math.sqrt(2)]))


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, y, ood_z = separable_features()
    det = fDBD(None, block_head()).fit_features(id_z, y)
    assert det.predict_features(ood_z).min() > det.predict_features(id_z).max()


def test_requires_fit_and_a_linear_head() -> None:
    with pytest.raises(RequiresFitException):
        fDBD(None, HEAD).predict_features(torch.rand(2, 2))
    with pytest.raises(ValueError, match="linear head"):
        fDBD(None, nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fDBD(None, nn.Linear(2, 1))
    with pytest.raises(ValueError, match="head's weights"):
        fDBD(None, None).fit_features(torch.rand(3, 2))
    with pytest.raises(ValueError, match="B x 2"):
        fDBD(None, HEAD).fit_features(torch.rand(3, 5))


def test_a_head_in_a_parameter_free_wrapper_is_read() -> None:
    wrapped = fDBD(None, nn.Sequential(nn.Flatten(), HEAD))
    assert torch.equal(wrapped.w, HEAD.weight) and torch.equal(wrapped.b, torch.zeros(3))


def test_roundtrip_needs_no_head_and_duplicate_class_vectors_are_refused(tmp_path: Path) -> None:
    id_z, y, ood_z = separable_features(32)
    det = fDBD(nn.Identity(), block_head()).fit([(id_z[:16], y[:16]), (id_z[16:], y[16:])])
    loaded = assert_roundtrip(det, ood_z, tmp_path)  # w and b are part of the state
    assert loaded.num_classes == 4 and loaded.feature_dim == 16
    tensors, meta = split_state(save_detector(det))
    tensors["w"][1] = tensors["w"][0]
    with pytest.raises(InvalidStateError, match="same weight vector"):
        load_detector(resave(tensors, meta))


def test_merged_shards_equal_one_stream() -> None:
    id_z, y, ood_z = separable_features(60, seed=1)
    y[::7] = -1
    batches = [(id_z[i : i + 6], y[i : i + 6]) for i in range(0, 60, 6)]
    assert_shards_merge_to_stream(lambda: fDBD(None, block_head()), batches, ood_z, head=block_head())
