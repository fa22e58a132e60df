import pytest
import torch

from ood_core.api import RequiresFitException
from ood_core.detector import RMD

from .common import assert_roundtrip
from .test_mahalanobis import two_class_features


def test_hand_computed_relative_distances() -> None:
    # within-class covariance diag(1, 4), class means (0, 0) and (10, 0);
    # background: mean (5, 0), covariance diag(1 + 25, 4) (between-class spread 5^2 in x)
    x, y = two_class_features()
    det = RMD(None).fit_features(x, y)
    torch.testing.assert_close(det.background_mu, torch.tensor([5.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(det.background_precision, torch.diag(torch.tensor([1 / 26, 1 / 4], dtype=torch.float64)))
    query = torch.tensor([[3.0, 4.0], [5.0, 0.0], [10.0, 0.0]])
    # (3, 4): min(9 + 4, 49 + 4) - (4 / 26 + 16 / 4) ; (5, 0): 25 - 0 ; (10, 0): 0 - 25 / 26
    expected = torch.tensor([13.0 - (4 / 26 + 4.0), 25.0, -25 / 26])
    torch.testing.assert_close(det.predict_features(query), expected)


def test_ood_scores_higher_on_separable_data() -> None:
    g = torch.Generator().manual_seed(1)
    centres = 6.0 * torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    det = RMD(None).fit_features(centres[y] + torch.randn(400, 8, generator=g), y)
    id_test = centres[torch.arange(40) % 4] + torch.randn(40, 8, generator=g)
    ood_test = centres[:2].mean(0) + 0.5 * torch.randn(40, 8, generator=g)  # near-OOD: between two classes
    assert det.predict_features(ood_test).min() > det.predict_features(id_test).max()


def test_requires_fit_and_roundtrip(tmp_path) -> None:
    with pytest.raises(RequiresFitException):
        RMD(None).predict_features(torch.randn(2, 2))
    x, y = two_class_features()
    det = RMD(torch.nn.Identity()).fit(zip(x.split(3), y.split(3), strict=True))
    torch.testing.assert_close(det.predict(x), det.predict_features(x))
    assert_roundtrip(det, torch.randn(5, 2), tmp_path)
