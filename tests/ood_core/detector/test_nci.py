from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.detector import NCI

from .common import assert_roundtrip
from .shards import assert_shards_merge_to_stream
from .synthetic import block_head, separable_features


def head() -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    return layer


def test_score_is_minus_the_proximity_to_the_predicted_class_vector_minus_the_norm_term() -> None:
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [-40.0, 9.0]])
    det = NCI(None, head()).fit_features(z, torch.tensor([0, 1, -1]))
    assert det.global_mean.tolist() == [2.0, 2.0]
    h = torch.tensor([[5.0, 2.0], [2.0, 6.0]])
    # [5, 2]: logits [5, 4] -> class 0, centred [3, 0]: 3 * 1 / 3 = 1; [2, 6]: logits [2, 12] -> class 1,
    # centred [0, 4]: 4 * 2 / 4 = 2
    torch.testing.assert_close(det.predict_features(h), torch.tensor([-1.0, -2.0]))
    with_norm = NCI(None, head(), alpha=0.5).fit_features(z[:2])
    torch.testing.assert_close(with_norm.predict_features(h), torch.tensor([-1.0 - 3.5, -2.0 - 4.0]))


def test_negative_alpha_is_ignored_and_a_feature_at_the_mean_gets_proximity_zero() -> None:
    det = NCI(None, head(), alpha=-1.0).fit_features(torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    torch.testing.assert_close(det.predict_features(torch.tensor([[2.0, 2.0], [5.0, 2.0]])), torch.tensor([0.0, -1.0]))


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, y, ood_z = separable_features()
    for alpha in (0.0, 0.01):
        det = NCI(None, block_head(), alpha=alpha).fit_features(id_z, y)
        assert det.predict_features(ood_z).min() > det.predict_features(id_z).max()


def test_requires_fit_and_validates_arguments() -> None:
    with pytest.raises(RequiresFitException):
        NCI(None, head()).predict_features(torch.rand(2, 2))
    with pytest.raises(ValueError, match="finite"):
        NCI(None, head(), alpha=float("nan"))
    with pytest.raises(ValueError, match="no ID samples"):
        NCI(None, head()).fit_features(torch.rand(2, 2), torch.tensor([-1, -1]))


def test_roundtrip_and_hparams(tmp_path: Path) -> None:
    id_z, y, ood_z = separable_features(32)
    det = NCI(nn.Identity(), block_head(), alpha=0.25).fit([(id_z, y)])
    loaded = assert_roundtrip(det, ood_z, tmp_path)
    assert isinstance(loaded, NCI) and loaded.hparams() == {"alpha": 0.25} and torch.equal(loaded.w, det.w)


def test_merged_shards_equal_one_stream() -> None:
    id_z, y, ood_z = separable_features(60, seed=2)
    batches = [(id_z[i : i + 5], y[i : i + 5]) for i in range(0, 60, 5)]
    assert_shards_merge_to_stream(lambda: NCI(None, block_head(), alpha=0.1), batches, ood_z, head=block_head())
