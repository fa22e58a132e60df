import pytest
import torch

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import MultiMahalanobis
from ood_core.state import load_detector, save_detector

from ..state_helpers import resave, split_state
from .common import assert_roundtrip
from .test_mahalanobis import two_class_features


def layers() -> list[torch.nn.Module]:
    """Layer 1: identity on 2-D features; layer 2: keeps the x coordinate as a 1 x 2 x 2 feature map."""
    first = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0]] * 4))
    return [torch.nn.Identity(), torch.nn.Sequential(first, torch.nn.Unflatten(1, (1, 2, 2)))]


def test_hand_computed_weighted_sum() -> None:
    x, y = two_class_features()
    maps = x[:, :1, None, None].expand(8, 1, 2, 2)
    det = MultiMahalanobis(None, alpha=[1.0, 2.0]).fit_features([x, maps], y)
    query = torch.tensor([[3.0, 4.0], [8.0, 2.0]])
    # layer 1: 13, 5 (covariance diag(1, 4)) ; layer 2 (x only, variance 1): min(9, 49) = 9, min(64, 4) = 4
    expected = torch.tensor([13.0 + 2 * 9.0, 5.0 + 2 * 4.0])
    torch.testing.assert_close(det.predict_features([query, query[:, :1, None, None]]), expected)
    assert det.layer_dims.tolist() == [2, 1] and det.mu.shape == (2, 2, 2)


def test_predict_chains_the_layers_and_fit_streams() -> None:
    x, y = two_class_features()
    det = MultiMahalanobis(layers()).fit(zip(x.split(3), y.split(3), strict=True))
    query = torch.tensor([[3.0, 4.0], [8.0, 2.0]])
    torch.testing.assert_close(det.predict(query), torch.tensor([13.0 + 9.0, 5.0 + 4.0]))


def test_ood_scores_higher_on_separable_data() -> None:
    g = torch.Generator().manual_seed(4)
    centres = 6.0 * torch.randn(3, 6, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    x = centres[y] + torch.randn(300, 6, generator=g)
    det = MultiMahalanobis(None).fit_features([x, x[:, :3]], y)
    id_test = centres[torch.arange(30) % 3] + torch.randn(30, 6, generator=g)
    ood_test = 6.0 * torch.randn(30, 6, generator=g) + 20.0
    score = det.predict_features
    assert score([ood_test, ood_test[:, :3]]).min() > score([id_test, id_test[:, :3]]).max()


def test_requires_fit_and_layer_count_checks() -> None:
    with pytest.raises(RequiresFitException):
        MultiMahalanobis(None).predict_features([torch.randn(2, 2)])
    with pytest.raises(ValueError, match="alpha"):
        MultiMahalanobis(layers(), alpha=[1.0])
    x, y = two_class_features()
    det = MultiMahalanobis(None).fit_features([x, x[:, :1]], y)
    with pytest.raises(ValueError, match="list of 2"):
        det.predict_features([x])


def test_roundtrip_and_bad_padding(tmp_path) -> None:
    x, y = two_class_features()
    det = MultiMahalanobis(None, alpha=[0.5, 3.0]).fit_features([x, x[:, :1]], y)
    loaded = assert_roundtrip(det, [torch.randn(4, 2), torch.randn(4, 1)], tmp_path)
    assert loaded.alpha == [0.5, 3.0]
    path = tmp_path / "multi.safetensors"
    save_detector(det, path)
    tensors, header_meta = split_state(path.read_bytes())
    tensors["precision"][1, 1, 1] = 7.0  # beyond layer 2's width 1
    with pytest.raises(InvalidStateError, match="padding"):
        load_detector(resave(tensors, header_meta))
