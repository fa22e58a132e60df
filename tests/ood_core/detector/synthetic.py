"""Separable synthetic data for the detector tests: class-block features / feature maps with a matching linear
head (ID), and low-norm class-free noise (OOD)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CLASSES, BLOCK = 4, 4
DIM = CLASSES * BLOCK


def block_head(classes: int = CLASSES, block: int = BLOCK, scale: float = 4.0) -> nn.Linear:
    """``nn.Linear(classes * block, classes)`` whose class ``c`` weighs feature block ``c`` by ``scale``."""
    head = nn.Linear(classes * block, classes, bias=False)
    with torch.no_grad():
        head.weight.copy_(scale * torch.repeat_interleave(torch.eye(classes), block, dim=1))
    return head


def separable_features(n: int = 128, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(id_features, id_labels, ood_features)``: ID = 3 on the block of the class plus small noise; OOD =
    uniform noise in [0, 0.5) on every feature."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    id_z = 3.0 * torch.repeat_interleave(nn.functional.one_hot(y, CLASSES).float(), BLOCK, dim=1)
    id_z += 0.2 * torch.rand(n, DIM, generator=g)
    ood_z = 0.5 * torch.rand(n, DIM, generator=g)
    return id_z, y, ood_z


def separable_maps(n: int = 64, seed: int = 0, side: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Feature maps ``n x DIM x side x side``: both ID and OOD carry a strong zero-mean generic component
    (channel signs alternating within each class block, a checkerboard in space: it pools to 0); ID adds its
    class block, constant in space, OOD small noise."""
    g = torch.Generator().manual_seed(seed)
    channels = torch.tensor([(-1.0) ** i for i in range(DIM)])
    board = torch.tensor([[(-1.0) ** (i + j) for j in range(side)] for i in range(side)])
    generic = 2.0 * channels[:, None, None] * board
    y = torch.arange(n) % CLASSES
    blocks = torch.repeat_interleave(nn.functional.one_hot(y, CLASSES).float(), BLOCK, dim=1)
    id_maps = generic + 3.0 * blocks[:, :, None, None] + 0.05 * torch.randn(n, DIM, side, side, generator=g)
    ood_maps = generic + 0.3 * torch.rand(n, DIM, side, side, generator=g)
    return id_maps, y, ood_maps


def maps_head(classes: int = CLASSES, block: int = BLOCK) -> nn.Sequential:
    """Global average pooling, then :func:`block_head`."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), block_head(classes, block))
