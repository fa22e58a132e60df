"""Conversions shared by the augmentations: PIL images, ``uint8`` and float tensors to float ``C x H x W`` tensors
in ``[0, 1]`` and back, and uniform draws from an optional :class:`torch.Generator`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def to_float_image(img: Any) -> Tensor:
    """A PIL image, ``H x W (x C)`` array or ``(C x) H x W`` tensor (``uint8`` or float in ``[0, 1]``) as a float32
    ``C x H x W`` tensor in ``[0, 1]``.

    :raises TypeError: for anything else
    """
    if isinstance(img, Image.Image | np.ndarray):
        img = TF.to_image(img)
    if not isinstance(img, Tensor):
        raise TypeError(f"expected a PIL image, an array or a tensor, got {type(img).__name__}")
    img = img.as_subclass(Tensor)
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3:
        raise ValueError(f"expected a C x H x W image, got shape {tuple(img.shape)}")
    return TF.to_dtype(img, torch.float32, scale=True)


def like_input(result: Tensor, original: Any) -> Any:
    """``result`` (float ``C x H x W`` in ``[0, 1]``) in the type of ``original``: a PIL image for a PIL image (same
    mode), a tensor of the original dtype otherwise."""
    if isinstance(original, Image.Image):
        pil = TF.to_pil_image(TF.to_dtype(result, torch.uint8, scale=True))
        return pil.convert(original.mode) if pil.mode != original.mode else pil
    if isinstance(original, Tensor) and original.dtype != result.dtype:
        out = TF.to_dtype(result, original.dtype, scale=True)
        return out.reshape(original.shape) if original.dim() == 2 else out
    if isinstance(original, Tensor) and original.dim() == 2:
        return result.reshape(original.shape)
    return result


def match_channels(img: Tensor, channels: int) -> Tensor:
    """Gray to RGB by repetition, RGB to gray by luminance; other mismatches raise ``ValueError``."""
    if img.shape[0] == channels:
        return img
    if img.shape[0] == 1:
        return img.expand(channels, -1, -1)
    if img.shape[0] == 3 and channels == 1:
        return TF.rgb_to_grayscale(img)
    raise ValueError(f"cannot match an image with {img.shape[0]} channels to one with {channels}")


def uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    """A float drawn uniformly from ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """An int drawn uniformly from ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))
