"""Shared checks for detector tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector
from ood_core.state import load_detector, save_detector


def assert_roundtrip(detector: Detector, x: Any, tmp_path: Path, model: Any = None, **modules: Any) -> Detector:
    """Save -> load through a file gives the same class, hyperparameters and identical scores."""
    path = tmp_path / f"{type(detector).__name__}.safetensors"
    save_detector(detector, path)
    loaded = load_detector(path, model=model, **modules)
    assert type(loaded) is type(detector)
    assert loaded.hparams() == detector.hparams()
    before, after = detector.predict_features(x), loaded.predict_features(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    return loaded


def separable_logits(n: int = 64, classes: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Confident ID logits (one large class logit) and flat OOD logits."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    id_logits = torch.randn(n, classes, generator=g) + 8.0 * torch.nn.functional.one_hot(y, classes)
    ood_logits = 0.3 * torch.randn(n, classes, generator=g)
    return id_logits, ood_logits
