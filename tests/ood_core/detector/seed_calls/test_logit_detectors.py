"""The seed calls of the detectors on logits and softmax: the API example with the feature interface, MaxSoftmax,
MCD, TemperatureScaling, KLMatching, Entropy and MaxLogit, OpenMax.

Run as the seed (``/work/shared/seeds``) writes them, importing from ``ood_core`` instead of ``pytorch_ood``; the
stand-in network and the fixtures: ``seed_network.py``, ``conftest.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ood_core.api import ModelNotSetException, RequiresFitException
from ood_core.detector import (
    MCD,
    Entropy,
    KLMatching,
    Mahalanobis,
    MaxLogit,
    MaxSoftmax,
    OpenMax,
    TemperatureScaling,
)
from tests.ood_core.detector.seed_calls.seed_network import (
    WideResNet,
    assert_scores,
    features_and_labels,
    num_classes,
)


def test_api_example_and_feature_interface(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    # seed: detector = Detector(model); detector.fit(data_loader); scores = detector(x)
    detector = Mahalanobis(model.features, eps=0.0)
    detector.fit(data_loader)
    scores = detector(x)
    # seed: detector = Detector(model=None); detector.fit_features(...); scores = detector.predict_features(...)
    train_features, train_labels = features_and_labels(model.features, data_loader)
    detector = Mahalanobis(model=None)
    detector.fit_features(train_features, train_labels)
    with torch.no_grad():
        test_features = model.features(x)
    torch.testing.assert_close(detector.predict_features(test_features), scores, rtol=1e-3, atol=1e-3)
    with pytest.raises(ModelNotSetException):
        detector.predict(x)
    with pytest.raises(RequiresFitException):
        Mahalanobis(model.features).predict(x)


def test_maxsoftmax(model: WideResNet, x: Tensor) -> None:
    detector = MaxSoftmax(model, t=1.0)
    logits = model(x)
    torch.testing.assert_close(detector(x), -logits.softmax(dim=1).max(dim=1).values)
    torch.testing.assert_close(MaxSoftmax.score(logits, t=2.0), -(logits / 2.0).softmax(dim=1).max(dim=1).values)
    torch.testing.assert_close(MaxSoftmax(model=None).predict_features(logits), detector(x))


def test_mcd(model: WideResNet, x: Tensor) -> None:
    detector = MCD(model, samples=30, mode="var", batch_norm=True)
    assert detector.n_samples == 30
    torch.manual_seed(0)
    scores = detector(x)
    torch.manual_seed(0)
    mean, var = MCD.run(model, x, 30, batch_norm=True)  # as pytorch-ood's code: the max mean softmax, the variance
    torch.testing.assert_close(scores, var)
    torch.manual_seed(0)
    run_mean = MCD.run_mean(model, x, 30, batch_norm=True)
    assert run_mean.shape == (len(x), num_classes)
    torch.testing.assert_close(run_mean.max(dim=1).values, mean)
    torch.manual_seed(0)
    torch.testing.assert_close(MCD(model, samples=30, mode="mean")(x), -run_mean.max(dim=1).values)
    assert not model.training


def test_temperature_scaling(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = TemperatureScaling(model)
    detector.fit(data_loader, device="cpu")
    logits, labels = features_and_labels(model, data_loader)
    feature_detector = TemperatureScaling(model=None).fit_features(logits, labels)
    torch.testing.assert_close(feature_detector.predict_features(model(x)), detector(x))
    assert_scores(detector(x), len(x))


def test_klmatching(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = KLMatching(model)
    detector.fit(data_loader, device="cpu")
    logits, labels = features_and_labels(model, data_loader)
    feature_detector = KLMatching(model=None).fit_features(logits, labels, device="cpu")
    torch.testing.assert_close(feature_detector.predict_features(model(x)), detector(x))
    assert_scores(detector(x), len(x))


def test_entropy_and_maxlogit(model: WideResNet, x: Tensor) -> None:
    logits = model(x)
    p = logits.softmax(dim=1)
    torch.testing.assert_close(Entropy(model)(x), -(p * p.log()).sum(dim=1))
    torch.testing.assert_close(Entropy.score(logits), Entropy(model)(x))
    torch.testing.assert_close(MaxLogit(model)(x), -logits.max(dim=1).values)
    torch.testing.assert_close(MaxLogit.score(logits), MaxLogit(model=None).predict_features(logits))


def test_openmax(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = OpenMax(model, tailsize=25, alpha=10, euclid_weight=1.0)
    detector.fit(data_loader, device="cpu")
    logits, y = features_and_labels(model, data_loader)
    feature_detector = OpenMax(model=None, tailsize=25, alpha=10, euclid_weight=1.0).fit_features(logits, y)
    torch.testing.assert_close(feature_detector.predict_features(model(x)), detector(x))
    scores = detector(x)
    assert_scores(scores, len(x))
    assert bool(((scores >= 0) & (scores <= 1)).all())  # the probability of the unknown class
