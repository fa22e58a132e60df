import pytest
import torch

from ood_core import gaussian as gaussian_module
from ood_core.api import RequiresFitException
from ood_core.detector import Mahalanobis

from .common import assert_roundtrip


def two_class_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 at (0, 0), class 1 at (10, 0); within-class deviations +-1 in x and +-2 in y.

    Pooled covariance = diag(1, 4) (each point deviates by 1 in x, 2 in y), so precision = diag(1, 1/4).
    """
    offsets = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]])
    centre = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.cat([centre[0] + offsets, centre[1] + offsets])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return x, y


def test_hand_computed_distances() -> None:
    x, y = two_class_features()
    det = Mahalanobis(None).fit_features(x, y)
    torch.testing.assert_close(det.mu, torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(det.precision, torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64)))
    query = torch.tensor([[0.0, 0.0], [3.0, 4.0], [8.0, 2.0], [5.0, 0.0]])
    # min over classes of dx^2 + dy^2 / 4:  0 ; min(9 + 4, 49 + 4) = 13 ; min(64 + 1, 4 + 1) = 5 ; 25
    torch.testing.assert_close(det.predict_features(query), torch.tensor([0.0, 13.0, 5.0, 25.0]))


def test_ood_labels_are_ignored_and_feature_maps_pooled() -> None:
    x, y = two_class_features()
    noisy = Mahalanobis(None).fit_features(
        torch.cat([x, 100 * torch.randn(5, 2)]), torch.cat([y, -torch.ones(5).long()])
    )
    torch.testing.assert_close(noisy.mu, Mahalanobis(None).fit_features(x, y).mu)
    maps = torch.tensor([[3.0, 4.0]])[:, :, None, None].expand(1, 2, 3, 3)
    torch.testing.assert_close(noisy.predict_features(maps), torch.tensor([13.0]))


def test_ood_scores_higher_on_separable_data() -> None:
    g = torch.Generator().manual_seed(0)
    centres = 6.0 * torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 8, generator=g)
    det = Mahalanobis(None).fit_features(x, y)
    id_test = centres[torch.arange(40) % 4] + torch.randn(40, 8, generator=g)
    ood_test = 6.0 * torch.randn(40, 8, generator=g) + 20.0
    assert det.predict_features(ood_test).min() > det.predict_features(id_test).max()


def test_singular_covariance_gives_finite_scores() -> None:
    x, y = two_class_features()
    x = torch.cat([x, torch.zeros(8, 1)], 1)  # a dead unit: zero variance
    det = Mahalanobis(None).fit_features(x, y)
    scores = det.predict_features(torch.tensor([[3.0, 4.0, 0.0], [3.0, 4.0, 7.0]]))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.tensor([13.0, 13.0]))  # the degenerate direction is ignored


def test_requires_fit() -> None:
    with pytest.raises(RequiresFitException):
        Mahalanobis(None).predict_features(torch.randn(2, 2))
    with pytest.raises(RequiresFitException):
        Mahalanobis(torch.nn.Identity()).predict(torch.randn(2, 2))


def test_missing_class_is_an_error() -> None:
    x, y = two_class_features()
    with pytest.raises(ValueError, match="no samples"):
        Mahalanobis(None).fit_features(x, y * 2)


def test_predict_preprocessing_moves_towards_the_closest_centre() -> None:
    x, y = two_class_features()
    model = torch.nn.Identity()
    query = torch.tensor([[3.0, 4.0], [8.0, 2.0]])
    plain = Mahalanobis(model, eps=0.0).fit_features(x, y)
    torch.testing.assert_close(plain.predict(query), plain.predict_features(query))
    det = Mahalanobis(model, eps=0.5, norm_std=[0.5, 1.0]).fit_features(x, y)
    # gradient signs of the distance at (3, 4) to (0, 0): (+, +); step = 0.5 / std = (1.0, 0.5)
    # -> (2, 3.5): 4 + 12.25 / 4 ; at (8, 2) to (10, 0): (-, +) -> (9, 1.5): 1 + 2.25 / 4
    torch.testing.assert_close(det.predict(query), torch.tensor([4.0 + 12.25 / 4, 1.0 + 2.25 / 4]))
    torch.testing.assert_close(det.predict_features(query), plain.predict_features(query))  # no preprocessing


def test_predict_under_inference_mode_still_preprocesses() -> None:
    x, y = two_class_features()
    det = Mahalanobis(torch.nn.Identity(), eps=0.5).fit_features(x, y)
    with torch.inference_mode():
        scores = det.predict(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(scores, torch.tensor([(2.5**2) + 3.5**2 / 4]))


def test_roundtrip(tmp_path) -> None:
    x, y = two_class_features()
    det = Mahalanobis(None, eps=0.01, norm_std=[0.2, 0.3]).fit_features(x, y)
    loaded = assert_roundtrip(det, torch.randn(6, 2), tmp_path)
    assert loaded.eps == 0.01 and loaded.norm_std == [0.2, 0.3]
    assert (loaded.feature_dim, loaded.num_classes) == (2, 2)


def test_large_batches_are_fitted_in_chunks(monkeypatch) -> None:
    g = torch.Generator().manual_seed(7)
    y = torch.arange(50) % 3
    x = torch.randn(50, 4, generator=g) + 4.0 * y[:, None]
    whole = Mahalanobis(None).fit_features(x, y)
    monkeypatch.setattr(gaussian_module, "CHUNK_ROWS", 7)
    chunked = Mahalanobis(None).fit_features(x, y)
    torch.testing.assert_close(chunked.precision, whole.precision)
    torch.testing.assert_close(chunked.mu, whole.mu)
