"""The seed calls of the energy and input-perturbation detectors: the overview's EnergyBased + OODMetrics loop,
the WeightedEBO example, ODIN and its preprocessing.

Run as the seed (``/work/shared/seeds``) writes them, importing from ``ood_core`` instead of ``pytorch_ood``; the
stand-in network and the fixtures: ``seed_network.py``, ``conftest.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ood_core.api import FeaturesNotSupportedError
from ood_core.detector import (
    ODIN,
    EnergyBased,
    WeightedEBO,
    odin_preprocessing,
)
from ood_core.utils import OODMetrics
from tests.ood_core.detector.seed_calls.seed_network import (
    WideResNet,
    assert_scores,
    num_classes,
)


def test_energy_based_overview_example(model: WideResNet, x: Tensor) -> None:
    # seed (overview): detector = EnergyBased(model); metrics = OODMetrics();
    # for x, y in data_loader: metrics.update(detector(x), y); print(metrics.compute())
    data_loader = [(x, torch.zeros(len(x), dtype=torch.long)), (torch.rand(12, 3, 8, 8) * 4, -torch.ones(12))]
    detector = EnergyBased(model)
    metrics = OODMetrics()
    for x_batch, y in data_loader:
        metrics.update(detector(x_batch), y)
    result = metrics.compute()
    assert {"AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"} <= set(result)
    logits = model(x)
    torch.testing.assert_close(EnergyBased(model, t=1.0)(x), -torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(EnergyBased.score(logits, t=2.0), -2.0 * torch.logsumexp(logits / 2.0, dim=1))


def test_weighted_ebo_example(model: WideResNet, x: Tensor) -> None:
    images = x
    # seed: weights = torch.nn.Linear(num_classes, 1)); detector = WeightedEBO(model, weights); scores = ...
    weights = torch.nn.Linear(num_classes, 1)  # (the seed's line has a stray closing parenthesis)
    detector = WeightedEBO(model, weights)
    scores = detector(images)
    w = weights.weight.detach().relu()
    torch.testing.assert_close(scores, -torch.log((w * model(images).exp()).sum(dim=1)))
    torch.testing.assert_close(WeightedEBO.score(model(images), weights), scores)


def test_odin(model: WideResNet, x: Tensor) -> None:
    detector = ODIN(model, criterion=None, eps=0.05, temperature=1000.0, norm_std=None)
    assert (detector.eps, detector.temperature) == (0.05, 1000.0)
    scores = detector(x)
    assert_scores(scores, len(x))
    x_hat = odin_preprocessing(model, x, y=None, criterion=None, eps=0.05, temperature=1000, norm_std=None)
    assert x_hat.shape == x.shape
    assert torch.allclose((x_hat - x).abs(), torch.full_like(x, 0.05))  # one signed step of size eps per pixel
    with pytest.raises(FeaturesNotSupportedError):  # seed: "this method can not be used" (raises Exception)
        detector.predict_features(model(x))
