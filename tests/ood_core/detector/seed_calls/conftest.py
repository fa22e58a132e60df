"""Fixtures of the seed-call tests: the stand-in ``WideResNet`` (trained briefly, copied per test), the fit loader
and the test images."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.ood_core.detector.seed_calls.seed_network import WideResNet, images


@pytest.fixture(scope="module")
def trained() -> WideResNet:
    """The stand-in, trained briefly on the fit images (the seed's model is pretrained): every class is then
    predicted correctly on some images, which SHE and OpenMax fit on."""
    net = WideResNet()
    fit_x, fit_y = images(90, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(fit_x), fit_y).backward()
        opt.step()
    return net.eval()


@pytest.fixture
def model(trained: WideResNet) -> WideResNet:
    return copy.deepcopy(trained)


@pytest.fixture
def data_loader() -> DataLoader:
    return DataLoader(TensorDataset(*images(90, seed=1)), batch_size=32)


@pytest.fixture
def x() -> Tensor:
    return images(12, seed=2)[0]
