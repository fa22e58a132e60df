"""The seed calls of the activation-shaping detectors: the ASH and ReAct examples, DICE.

Run as the seed (``/work/shared/seeds``) writes them, importing from ``ood_core`` instead of ``pytorch_ood``; the
stand-in network and the fixtures: ``seed_network.py``, ``conftest.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ood_core.detector import (
    ASH,
    DICE,
    EnergyBased,
    ReAct,
)
from tests.ood_core.detector.seed_calls.seed_network import (
    WideResNet,
    assert_scores,
    features_and_labels,
)


def test_ash_example(model: WideResNet, x: Tensor) -> None:
    images = x
    detector = ASH(backbone=model.features_before_pool, head=model.forward_from_before_pool, detector=EnergyBased.score)
    scores = detector(images)
    assert_scores(scores, len(images))
    same = ASH(model.features_before_pool, model.forward_from_before_pool, variant="ash-s", percentile=0.65)
    torch.testing.assert_close(same(images), scores)  # the default detector is energy based


def test_react_example(model: WideResNet, x: Tensor) -> None:
    images = x
    detector = ReAct(backbone=model.features, head=model.fc, detector=EnergyBased.score)
    scores = detector(images)
    with torch.no_grad():
        expected = EnergyBased.score(model.fc(model.features(images).clip(max=1.0)))
    torch.testing.assert_close(scores, expected)  # default threshold 1.0, no fit needed
    torch.testing.assert_close(ReAct(model.features, model.fc, 1.0, EnergyBased.score)(images), scores)
    torch.testing.assert_close(ReAct(model.features, model.fc, threshold=1.0, detector=None)(images), scores)


def test_dice(model: WideResNet, data_loader: DataLoader, x: Tensor) -> None:
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    detector = DICE(model.features, w=w, b=b, p=0.7, detector=None)
    detector.fit(data_loader, device="cpu")
    z, y = features_and_labels(model.features, data_loader)
    feature_detector = DICE(None, w, b, 0.7).fit_features(z, y)
    torch.testing.assert_close(feature_detector.predict_features(model.features(x).detach()), detector(x))
    assert_scores(detector(x), len(x))
