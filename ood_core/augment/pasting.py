"""Outlier pasting for segmentation (Chan, Rottmann, Gottschalk, "Entropy Maximization and Meta Classification for
Out-of-Distribution Detection in Semantic Segmentation", ICCV 2021): cut-out objects of an outlier set are pasted
into training images and their pixels labeled OOD, so that a segmentation network can be trained with an OOD
objective (e.g. :class:`~ood_core.loss.OutlierExposureLoss`, :class:`~ood_core.loss.EnergyRegularizedLoss`).

:class:`OutlierPaste` takes any user-supplied set of cut-outs; :class:`~ood_core.augment.coco.InsertCOCO` builds
them from a local COCO copy, as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ood_core.augment.images import like_input, match_channels, randint, to_float_image, uniform

#: pytorch-ood's default relative size range of a pasted object: 20% to 50% of its size, times ``upscale``
DEFAULT_UPSCALE = 1.4150357439499515


def as_cutout(item: Any) -> tuple[Tensor, Tensor]:
    """An outlier-set item as ``(image, mask)``: a float ``C x h x w`` tensor in ``[0, 1]`` and a boolean ``h x w``
    mask of the object. Items may be ``(image, mask)`` pairs (images as for :func:`to_float_image`, masks as
    tensors, arrays or PIL images, nonzero = object) or images with an alpha channel (RGBA / LA; alpha > 0 = object).

    :raises ValueError: if the mask does not match the image
    """
    if isinstance(item, tuple | list):
        image, mask = item
        img = to_float_image(image)
        m = torch.as_tensor(np.asarray(mask)) if not isinstance(mask, Tensor) else mask
        m = m.reshape(m.shape[-2:]) if m.dim() == 3 and m.shape[0] == 1 else m
        if m.shape != img.shape[-2:]:
            raise ValueError(f"mask of shape {tuple(m.shape)} does not match the image {tuple(img.shape)}")
        return img, m.bool()
    if isinstance(item, Image.Image) and item.mode not in ("RGBA", "LA"):
        raise ValueError(f"an outlier image without a mask needs an alpha channel (RGBA or LA), got mode {item.mode}")
    img = to_float_image(item)
    if img.shape[0] not in (2, 4):
        raise ValueError(f"an outlier tensor without a mask needs an alpha channel, got {img.shape[0]} channels")
    return img[:-1], img[-1] > 0


def _crop_to_alpha(rgba: Tensor) -> Tensor:
    """Crop a premultiplied ``(C + 1) x h x w`` cut-out to the box of its object (alpha > 1/2)."""
    inside = rgba[-1] > 0.5
    rows, cols = torch.nonzero(inside.any(1)).flatten(), torch.nonzero(inside.any(0)).flatten()
    return rgba[:, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def _resize(rgba: Tensor, size: tuple[int, int]) -> Tensor:
    return TF.resize(rgba, list(size), antialias=True)


class OutlierPaste:
    """Joint ``(image, target)`` transform that pastes cut-outs of ``outliers`` into the image and sets the pasted
    pixels of the segmentation target to ``ood_mask_value`` (pytorch-ood's ``InsertCOCO`` for any outlier set).

    With probability ``p`` an image receives ``n`` objects. Each object is drawn uniformly, cropped to its mask,
    scaled by :math:`s \\sim U(\\text{scale})` of its own size, rotated by a uniform angle (the canvas grows, so no part
    is cut off), flipped horizontally with probability 1/2, shrunk if it would not fit ``margin`` pixels inside the
    image, and placed at a uniform position. Image and target may be PIL images, arrays or tensors; the image comes
    back in its own type and the target as an ``int64`` ``H x W`` tensor (also when nothing is pasted). Use it as
    the ``transforms`` of a torchvision segmentation dataset.

    :param outliers: sequence of cut-outs: ``(image, mask)`` pairs or RGBA images (see :func:`as_cutout`)
    :param p: probability of pasting into an image, in ``[0, 1]``
    :param n: objects per pasted image
    :param ood_mask_value: target value of pasted pixels (``-1``, the library's OOD label, as in pytorch-ood)
    :param scale: range of the scale factor relative to the object's size
    :param rotate: rotate the objects
    :param flip: flip them horizontally at random
    :param margin: distance of the objects from the image border, in pixels (reduced on small images)
    :param generator: random source (default: torch's global one)
    """

    def __init__(
        self,
        outliers: Sequence[Any],
        p: float = 0.1,
        n: int = 1,
        ood_mask_value: int = -1,
        scale: tuple[float, float] = (0.2 * DEFAULT_UPSCALE, 0.5 * DEFAULT_UPSCALE),
        rotate: bool = True,
        flip: bool = True,
        margin: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if n < 1 or margin < 0 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"need n >= 1, margin >= 0 and 0 < scale[0] <= scale[1], got {n}, {margin}, {scale}")
        self.outliers = outliers
        self.p, self.n, self.ood_mask_value = float(p), int(n), int(ood_mask_value)
        self.scale, self.rotate, self.flip, self.margin = (float(scale[0]), float(scale[1])), rotate, flip, margin
        self.generator = generator

    def __call__(self, img: Any, target: Any) -> tuple[Any, Tensor]:
        """``(img, target)`` with ``n`` objects pasted, with probability ``p``."""
        target_t = torch.as_tensor(np.asarray(target) if not isinstance(target, Tensor) else target).long()
        if uniform(self.generator) >= self.p or len(self.outliers) == 0:
            return img, target_t
        x = to_float_image(img)
        if target_t.shape != x.shape[-2:]:
            raise ValueError(f"target of shape {tuple(target_t.shape)} does not match the image {tuple(x.shape)}")
        x, target_t = x.clone(), target_t.clone()
        for _ in range(self.n):
            item = self.outliers[randint(self.generator, 0, len(self.outliers) - 1)]
            self.paste(x, target_t, *as_cutout(item))
        return like_input(x, img), target_t

    def paste(self, img: Tensor, target: Tensor, obj: Tensor, mask: Tensor) -> None:
        """Paste one object (float ``C x h x w``, boolean ``h x w`` mask) into ``img`` and ``target``, in place."""
        if not bool(mask.any()):
            return
        g = self.generator
        # premultiplied alpha: resampling then mixes object colors only, never the background around the object
        alpha = mask[None].to(obj.dtype)
        rgba = _crop_to_alpha(torch.cat([match_channels(obj, img.shape[0]) * alpha, alpha]))
        s = uniform(g, *self.scale)
        rgba = _resize(rgba, (max(1, round(rgba.shape[1] * s)), max(1, round(rgba.shape[2] * s))))
        if self.rotate:
            rgba = TF.rotate(rgba, uniform(g, 0.0, 360.0), interpolation=TF.InterpolationMode.BILINEAR, expand=True)
        if not bool((rgba[-1] > 0.5).any()):
            return  # shrunk or rotated away
        rgba = _crop_to_alpha(rgba)
        if self.flip and uniform(g) < 0.5:
            rgba = rgba.flip(-1)
        height, width = img.shape[-2:]
        margin = min(self.margin, (height - 1) // 2, (width - 1) // 2)
        room_h, room_w = height - 2 * margin, width - 2 * margin
        if rgba.shape[1] > room_h or rgba.shape[2] > room_w:
            shrink = min(room_h / rgba.shape[1], room_w / rgba.shape[2])
            rgba = _resize(
                rgba,
                (max(1, min(room_h, int(rgba.shape[1] * shrink))), max(1, min(room_w, int(rgba.shape[2] * shrink)))),
            )
        obj, mask = (rgba[:-1] / rgba[-1:].clamp_min(1e-6)).clamp(0, 1), rgba[-1] > 0.5
        h, w = mask.shape
        top, left = randint(g, margin, height - margin - h), randint(g, margin, width - margin - w)
        region = img[:, top : top + h, left : left + w]
        region.copy_(torch.where(mask, obj, region))
        target[top : top + h, left : left + w].masked_fill_(mask, self.ood_mask_value)
