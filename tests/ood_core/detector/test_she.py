import pytest
import torch
from torch import nn

from ood_core.api import ModelNotSetException, RequiresFitException
from ood_core.detector import SHE

from .common import assert_roundtrip


def identity_head(dim: int = 2) -> nn.Linear:
    head = nn.Linear(dim, dim, bias=False)
    head.weight.data = torch.eye(dim)
    return head


def test_patterns_are_means_of_correct_id_samples_and_score_is_minus_inner_product() -> None:
    z = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 5.0], [0.0, 100.0]])
    y = torch.tensor([0, 0, 1, 1, 0, -1])  # [0, 5] is misclassified (predicted 1), the last is OOD
    det = SHE(None, identity_head()).fit_features(z, y)
    torch.testing.assert_close(det.patterns, torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    # [1, 0] -> class 0: -(1*3); [1, 2] -> class 1: -(2*2); [-1, -3] -> class 0: -(-1*3)
    scores = det.predict_features(torch.tensor([[1.0, 0.0], [1.0, 2.0], [-1.0, -3.0]]))
    torch.testing.assert_close(scores, torch.tensor([-3.0, -4.0, 3.0]))
    assert (det.feature_dim, det.num_classes) == (2, 2)


def test_requires_fit_and_head() -> None:
    with pytest.raises(RequiresFitException):
        SHE(None, identity_head()).predict_features(torch.rand(2, 2))
    with pytest.raises(ModelNotSetException):
        SHE(None, None).fit_features(torch.rand(2, 2), torch.tensor([0, 1]))


def test_class_without_correct_sample_is_an_error() -> None:
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        SHE(None, identity_head(3)).fit_features(z, torch.tensor([0, 1]))


def test_fit_streams_like_fit_features_on_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=g)
    z = 3.0 * nn.functional.one_hot(y, 3).float() + torch.randn(60, 3, generator=g)
    y[::7] = -1
    model, head = nn.Identity(), identity_head(3)
    streamed = SHE(model, head).fit([(z[i : i + 6], y[i : i + 6]) for i in range(0, 60, 6)])
    whole = SHE(None, head).fit_features(z, y)
    torch.testing.assert_close(streamed.patterns, whole.patterns)
    torch.testing.assert_close(streamed(z), whole.predict_features(z))


def test_ood_scores_higher_on_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64,), generator=g)
    id_feats = 5.0 * nn.functional.one_hot(y, 4).float() + 0.5 * torch.randn(64, 4, generator=g)
    ood_feats = 0.5 * torch.randn(64, 4, generator=g)
    det = SHE(None, identity_head(4)).fit_features(id_feats, y)
    assert det.predict_features(ood_feats).min() > det.predict_features(id_feats).max()


def test_roundtrip(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(5)
    z = 3.0 * nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(15, 3, generator=g)
    model, head = nn.Identity(), identity_head(3)
    det = SHE(model, head).fit_features(z, y)
    loaded = assert_roundtrip(det, torch.randn(4, 3), tmp_path, model=model, head=head)
    torch.testing.assert_close(loaded(z), det(z), rtol=0, atol=0)
