"""Saving and loading the zoo's weights as safetensors (no pickle: ``weights_only`` semantics by construction)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ood_core.errors import OODError
from ood_core.zoo.models import DigitsCNN, DigitsSegmenter

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digits_cnn.safetensors"
SEGMENTER_WEIGHTS = WEIGHTS_DIR / "digits_segmenter.safetensors"


class WeightsMismatchError(OODError, ValueError):
    """A weights file does not match the network: missing or unexpected tensors, or wrong shapes."""


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_weights(module: nn.Module, path: str | Path) -> None:
    """Write ``module.state_dict()`` (contiguous CPU copies) to a safetensors file (mode 0644), creating parent
    folders."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"architecture": type(module).__name__})
    Path(path).chmod(0o644)  # safetensors writes 0600; package data must be readable by any user


def load_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors file into ``module`` strictly; raise :class:`WeightsMismatchError` naming every
    missing, unexpected or wrongly shaped tensor."""
    tensors = load_file(str(path))
    expected = module.state_dict()
    problems = [f"missing {name} {tuple(t.shape)}" for name, t in expected.items() if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [
        f"{name}: file has shape {tuple(tensors[name].shape)}, {type(module).__name__} expects {tuple(t.shape)}"
        for name, t in expected.items()
        if name in tensors and tensors[name].shape != t.shape
    ]
    if problems:
        raise WeightsMismatchError(f"weights file {path} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(tensors, strict=True)
    return module


def _load(module: nn.Module, path: str | Path, device: str | torch.device | None) -> nn.Module:
    load_weights(module, path)
    return module.to(default_device() if device is None else device).eval()


def load_classifier(path: str | Path | None = None, device: str | torch.device | None = None) -> DigitsCNN:
    """The trained :class:`DigitsCNN` (committed weights unless ``path`` is given) in eval mode on ``device``
    (default: CUDA when available, else CPU)."""
    model = DigitsCNN()
    _load(model, CLASSIFIER_WEIGHTS if path is None else path, device)
    return model


def load_segmenter(path: str | Path | None = None, device: str | torch.device | None = None) -> DigitsSegmenter:
    """The trained :class:`DigitsSegmenter` (committed weights unless ``path`` is given) in eval mode on
    ``device`` (default: CUDA when available, else CPU)."""
    model = DigitsSegmenter()
    _load(model, SEGMENTER_WEIGHTS if path is None else path, device)
    return model
