"""Values that would silently break scoring are refused on load (Detector.check_state), and at fit or
construction where that is cheap. The bad states are real fitted states with one tensor rewritten and the
digest recomputed, so that only the value check stands in the way."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError
from ood_core.calibration import Calibration
from ood_core.detector import KNN, RMD, KLMatching, Mahalanobis, MultiMahalanobis, OpenMax, TemperatureScaling, ViM
from ood_core.state import load_detector, save_detector

from .state_helpers import Meta, Tensors, resave, split_state

Edit = Callable[[Tensors, Meta], None]


def features(n: int = 60, dim: int = 4, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, dim, generator=g) + 2.0 * y[:, None].float(), y


def logits(n: int = 60, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, classes, generator=g) + 4.0 * torch.nn.functional.one_hot(y, classes), y


def fitted(name: str) -> Detector:
    x, y = features()
    z, labels = logits()
    makers: dict[str, Callable[[], Detector]] = {
        "Mahalanobis": lambda: Mahalanobis(None).fit_features(x, y),
        "RMD": lambda: RMD(None).fit_features(x, y),
        "MultiMahalanobis": lambda: MultiMahalanobis(None).fit_features([x, x[:, :2]], y),
        "KNN": lambda: KNN(None, k=3).fit_features(x, y),
        "ViM": lambda: ViM(None, d=2, w=torch.randn(3, 4), b=torch.randn(3)).fit_features(x, y),
        "TemperatureScaling": lambda: TemperatureScaling(None).fit_features(z, labels),
        "KLMatching": lambda: KLMatching(None).fit_features(z, labels),
        "OpenMax": lambda: OpenMax(None, tailsize=5).fit_features(z, labels),
    }
    return makers[name]()


def tampered(detector: Detector, edit: Edit, calibration: Calibration | None = None) -> bytes:
    tensors, meta = split_state(save_detector(detector, calibration=calibration))
    edit(tensors, meta)
    return resave(tensors, meta)


def put(name: str, change: Callable[[Tensor], Tensor]) -> Edit:
    return lambda t, m: t.__setitem__(name, change(t[name]))


def entry(index: tuple[int, ...], value: float) -> Callable[[Tensor], Tensor]:
    def change(t: Tensor) -> Tensor:
        t = t.clone()
        t[index] = value
        return t

    return change


CASES: list[tuple[str, Edit, str]] = [
    ("Mahalanobis", put("precision", torch.zeros_like), "'precision' is all zero"),
    ("Mahalanobis", put("precision", lambda p: p + torch.triu(torch.ones_like(p), 1)), "'precision' is not symmetric"),
    ("Mahalanobis", put("precision", lambda p: -p), "'precision' is not positive semi-definite"),
    ("Mahalanobis", put("precision", lambda p: p - 2 * p.diag().max() * torch.eye(4, dtype=p.dtype)), "semi-definite"),
    ("Mahalanobis", put("precision", entry((0, 0), float("inf"))), "'precision' contains NaN or Inf"),
    ("Mahalanobis", put("mu", entry((1, 2), float("nan"))), "'mu' contains NaN or Inf"),
    ("RMD", put("background_precision", lambda p: -p), "'background_precision' is not positive semi-definite"),
    ("RMD", put("precision", torch.zeros_like), "'precision' is all zero"),
    ("RMD", put("background_mu", entry((0,), float("-inf"))), "'background_mu' contains NaN or Inf"),
    ("MultiMahalanobis", put("precision", lambda p: torch.cat([p[:1], 0 * p[1:]])), r"'precision\[1\]' is all zero"),
    ("MultiMahalanobis", put("precision", lambda p: torch.cat([-p[:1], p[1:]])), r"'precision\[0\]' is not positive"),
    ("KNN", put("bank", entry((0, 0), float("nan"))), "'bank' contains NaN or Inf"),
    ("KNN", put("bank", lambda b: 2 * b), "unit vectors"),
    ("KNN", put("bank", lambda b: b[:0]), "fewer than k|at least k"),
    ("ViM", put("principal", lambda p: 2 * p), "orthonormal"),
    ("ViM", put("alpha", entry((0,), float("nan"))), "'alpha' contains NaN or Inf"),
    ("ViM", put("u", entry((0,), float("inf"))), "'u' contains NaN or Inf"),
    ("ViM", put("w", entry((0, 0), float("nan"))), "'w' contains NaN or Inf"),
    ("TemperatureScaling", put("t", torch.zeros_like), "'t' must be > 0"),
    ("TemperatureScaling", put("t", lambda t: -t), "'t' must be > 0"),
    ("KLMatching", put("counts", torch.zeros_like), "at least one class"),
    ("KLMatching", put("templates", entry((0, 0), float("nan"))), "'templates' contains NaN or Inf"),
    ("OpenMax", put("weibull", entry((0, 1), float("inf"))), "'weibull' contains NaN or Inf"),
]


@pytest.mark.parametrize(("cls", "edit", "message"), CASES)
def test_bad_values_are_refused_on_load(cls: str, edit: Edit, message: str) -> None:
    detector = fitted(cls)
    assert type(load_detector(save_detector(detector))) is type(detector)  # the state as fitted loads
    with pytest.raises(InvalidStateError, match=message):
        load_detector(tampered(detector, edit))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (put("calibration.quantiles", lambda q: q[:0]), "empty"),
        (put("calibration.quantiles", entry((3,), float("nan"))), "calibration.quantiles contains NaN or Inf"),
        (lambda t, m: m.__setitem__("calibration", '{"n": 0, "target_tpr": 0.9}'), "'n' must be an integer"),
        (lambda t, m: m.__setitem__("calibration", '{"n": true, "target_tpr": 0.9}'), "'n' must be an integer"),
        (lambda t, m: m.__setitem__("calibration", '{"n": 10, "target_tpr": "0.9"}'), "'target_tpr' must be a"),
        (lambda t, m: m.__setitem__("calibration", '{"n": 10, "target_tpr": 1.5}'), "target_tpr"),
        (lambda t, m: m.__setitem__("calibration", "[10, 0.9]"), "JSON object"),
    ],
)
def test_bad_calibration_is_refused_on_load(edit: Edit, message: str) -> None:
    calibration = Calibration.from_scores(torch.linspace(0.0, 1.0, 10))
    with pytest.raises(InvalidStateError, match=message):
        load_detector(tampered(fitted("Mahalanobis"), edit, calibration))


def test_singular_precision_of_degenerate_features_is_valid() -> None:
    """A constant and a collinear feature make the covariance singular: its pseudo-inverse is positive
    semi-definite but not definite (Cholesky fails), and that state must save and load."""
    x, y = features(dim=6)
    x = x.double()
    x[:, 2] = 3.0
    x[:, 4] = x[:, 0] + x[:, 1]
    for cls in (Mahalanobis, RMD):
        detector = cls(None).fit_features(x, y)
        assert int(torch.linalg.cholesky_ex(detector.precision).info) != 0
        loaded = load_detector(save_detector(detector))
        torch.testing.assert_close(loaded.predict_features(x[:5]), detector.predict_features(x[:5]), rtol=0, atol=0)


def test_fit_refuses_a_non_finite_state() -> None:
    x, y = features()
    x[3, 1] = float("inf")
    knn = KNN(None, k=3, normalize=False)
    with pytest.raises(InvalidStateError, match="'bank' contains NaN or Inf"):
        knn.fit_features(x, y)
    assert not knn.is_fitted
    x[3, 1] = float("nan")
    for detector in (Mahalanobis(None), RMD(None), MultiMahalanobis(None)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            detector.fit_features([x] if isinstance(detector, MultiMahalanobis) else x, y)
        assert not detector.is_fitted


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Mahalanobis(None, eps=float("inf")), "eps"),
        (lambda: Mahalanobis(None, eps=float("nan")), "eps"),
        (lambda: Mahalanobis(None, norm_std=[0.2, 0.0, 0.3]), "norm_std"),
        (lambda: Mahalanobis(None, norm_std=[float("inf")]), "norm_std"),
        (lambda: MultiMahalanobis(None, alpha=[1.0, float("nan")]), "alpha"),
    ],
)
def test_constructors_refuse_non_finite_hyperparameters(make: Callable[[], Detector], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
