"""The stand-in network of the seed's examples and the checks every seed-call test makes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

num_classes = 3


class WideResNet(nn.Module):
    """Stand-in for the seed's ``WideResNet`` with the method names its examples use."""

    def __init__(self, num_classes: int = num_classes) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3))
        self.fc = nn.Linear(16, num_classes)

    def features_before_pool(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward_from_before_pool(self, maps: Tensor) -> Tensor:
        return self.fc(maps.mean(dim=(2, 3)))

    def features(self, x: Tensor) -> Tensor:
        return self.features_before_pool(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from_before_pool(self.features_before_pool(x))


def images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    templates = torch.rand(num_classes, 3, 8, 8, generator=torch.Generator().manual_seed(42))
    return templates[y] + 0.3 * torch.randn(n, 3, 8, 8, generator=g), y


def features_and_labels(net: Callable[[Tensor], Tensor], loader: DataLoader) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        pairs = [(net(xb), yb) for xb, yb in loader]
    return torch.cat([z for z, _ in pairs]), torch.cat([y for _, y in pairs])


def close(a: Tensor, b: Tensor) -> None:
    """Equal up to the float32 rounding of a streamed fit (``fit(loader)``) against a one-shot one."""
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def assert_scores(scores: Tensor, n: int) -> None:
    assert scores.shape == (n,)
    assert bool(torch.isfinite(scores).all())
