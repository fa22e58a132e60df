"""The seed calls of the detectors fitted on features: Mahalanobis, MultiMahalanobis, RMD, ViM, KNN (with
scikit-learn keywords), SHE.

Run as the seed (``/work/shared/seeds``) writes them, importing from ``ood_core`` instead of ``pytorch_ood``; the
stand-in network and the fixtures: ``seed_network.py``, ``conftest.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ood_core.detector import (
    KNN,
    RMD,
    SHE,
    Mahalanobis,
    MultiMahalanobis,
    ViM,
)
from tests.ood_core.detector.seed_calls.seed_network import (
    WideResNet,
    assert_scores,
    close,
    features_and_labels,
    num_classes,
)


def test_mahalanobis(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = Mahalanobis(model.features, eps=0.002, norm_std=None)
    detector.fit(data_loader, device=None)
    assert detector.eps == 0.002
    assert detector.mu.shape == (num_classes, 16) and detector.cov.shape == detector.precision.shape == (16, 16)
    assert_scores(detector(x), len(x))
    z, y = features_and_labels(model.features, data_loader)
    feature_detector = Mahalanobis(model=None).fit_features(z, y, device=None)
    f = model.features(x).detach().double()
    d = torch.stack([((f - m) @ feature_detector.precision.double() * (f - m)).sum(dim=1) for m in feature_detector.mu])
    # seed: -max_k {-(f - mu_k)^T Sigma^-1 (f - mu_k)} = the distance to the closest centre
    torch.testing.assert_close(
        feature_detector.predict_features(f.float()).double(), d.min(dim=0).values, rtol=1e-4, atol=1e-4
    )


def test_mahalanobis_n_classes(model: WideResNet, data_loader: DataLoader) -> None:
    detector = Mahalanobis(model.features, eps=0.002, norm_std=None)
    detector.fit(data_loader, device=None)
    assert detector.n_classes == num_classes


def test_multi_mahalanobis(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    layers = [model.conv[:2], model.conv[2:]]
    detector = MultiMahalanobis(layers, alpha=None)
    detector.fit(data_loader, device=None)
    scores = detector(x)
    assert_scores(scores, len(x))
    with torch.no_grad():
        zs = [layers[0](x)]
        zs.append(layers[1](zs[0]))
    torch.testing.assert_close(detector.predict_features(zs), scores)


def test_multi_mahalanobis_predict_features_device(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    layers = [model.conv[:2], model.conv[2:]]
    detector = MultiMahalanobis(layers, alpha=None)
    detector.fit(data_loader, device=None)
    with torch.no_grad():
        zs = [layers[0](x)]
        zs.append(layers[1](zs[0]))
    torch.testing.assert_close(detector.predict_features(zs, device=None), detector(x))


def test_rmd(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = RMD(model.features)
    detector.fit(data_loader, device="cpu")
    z, y = features_and_labels(model.features, data_loader)
    feature_detector = RMD(model=None).fit_features(z, y, device=None)
    close(feature_detector.predict_features(model.features(x).detach()), detector(x))


def test_vim(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    detector = ViM(model.features, d=8, w=w, b=b)
    detector.fit(data_loader, device="cpu")
    assert float(detector.alpha) > 0  # seed: 'alpha: float' (here a one-element tensor, usable as a number)
    features, labels = features_and_labels(model.features, data_loader)
    feature_detector = ViM(None, 8, w, b).fit_features(features, labels)
    close(feature_detector.predict_features(model.features(x).detach()), detector(x))


def test_knn_with_scikit_learn_keywords(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = KNN(model.features, n_neighbors=1)  # seed: KNN(model, **knn_kwargs), passed to scikit-learn's k-NN
    detector.fit(data_loader, device="cpu")
    z, labels = features_and_labels(model.features, data_loader)
    feature_detector = KNN(model=None, n_neighbors=1).fit_features(z, labels)
    test_z = model.features(x).detach()
    scores = feature_detector.predict_features(test_z)
    torch.testing.assert_close(scores, detector(x))
    assert_scores(scores, len(x))
    # pytorch-ood 0.4.0 (and the paper) L2-normalize the features first; the seed's formula is on raw features,
    # which normalize=False gives
    nearest = torch.cdist(nn.functional.normalize(test_z), nn.functional.normalize(z)).min(dim=1).values
    torch.testing.assert_close(scores, nearest, rtol=1e-4, atol=1e-4)
    raw = KNN(model=None, n_neighbors=1, normalize=False).fit_features(z, labels).predict_features(test_z)
    torch.testing.assert_close(raw, torch.cdist(test_z, z).min(dim=1).values, rtol=1e-4, atol=1e-4)


def test_she(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    detector = SHE(model.features, model.fc)
    detector.fit(data_loader, device="cpu")
    z, y = features_and_labels(model.features, data_loader)
    feature_detector = SHE(model=None, head=model.fc).fit_features(z, y)
    torch.testing.assert_close(feature_detector.predict_features(model.features(x).detach()), detector(x))
