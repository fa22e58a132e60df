"""PixMix (Hendrycks, Zou, Mazeika, Tang, Li, Song, Steinhardt, "PixMix: Dreamlike Pictures Comprehensively
Improve Safety Measures", CVPR 2022): mixing training images with pictures of a *mixing set* (fractals, feature
visualizations...) that the user supplies; nothing is downloaded.

Algorithm 1 of the paper, for an image :math:`x` and a mixing picture :math:`m`::

    x_pixmix = augment(x) or x                       (probability 1/2 each)
    repeat r ~ U{0, ..., k} times:
        mix_image = augment(x) or m                  (probability 1/2 each)
        x_pixmix = clip(mix_op(x_pixmix, mix_image), 0, 1),   mix_op = additive or multiplicative (1/2 each)

The mixing operations draw weights :math:`(a, b)`: with probability 1/2 :math:`a \\sim B(\\beta, 1)`,
:math:`b \\sim B(1, \\beta)`, else :math:`a = 1 + B(1, \\beta)`, :math:`b = -B(1, \\beta)`; then

- additive: :math:`\\frac{1}{2}\\left(a (2x_1 - 1) + b (2x_2 - 1) + 1\\right)`,
- multiplicative: :math:`\\frac{1}{2}(2x_1)^a (2x_2)^b` (with :math:`x_2` clipped at :math:`10^{-37}`).

``augment`` is one AugMix operation at ``aug_severity`` (autocontrast, equalize, posterize, rotate, solarize,
shear, translate; with ``all_ops`` also color, contrast, brightness, sharpness), as in the authors' code.
pytorch-ood 0.4.0 implements only the first five operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ood_core.augment.images import match_channels, randint, to_float_image, uniform

Generator = torch.Generator | None


def beta_ab(beta: float, generator: Generator = None) -> tuple[float, float]:
    """The mixing weights ``(a, b)`` of PixMix (module docstring). ``B(beta, 1)`` and ``B(1, beta)`` are drawn by
    inverting their CDFs (:math:`U^{1/\\beta}` and :math:`1 - U^{1/\\beta}`), so a generator makes them reproducible."""

    def beta_1() -> float:  # B(beta, 1)
        return uniform(generator) ** (1.0 / beta)

    def one_beta() -> float:  # B(1, beta)
        return 1.0 - uniform(generator) ** (1.0 / beta)

    if uniform(generator) < 0.5:
        return beta_1(), one_beta()
    return 1.0 + one_beta(), -one_beta()


def add_mix(img1: Tensor, img2: Tensor, a: float, b: float) -> Tensor:
    """Additive mixing in :math:`[-1, 1]` space: :math:`(a (2x_1 - 1) + b (2x_2 - 1) + 1) / 2`."""
    return (a * (img1 * 2 - 1) + b * (img2 * 2 - 1) + 1) / 2


def multiply_mix(img1: Tensor, img2: Tensor, a: float, b: float) -> Tensor:
    """Multiplicative (geometric) mixing: :math:`(2x_1)^a (2x_2)^b / 2`, :math:`x_2` clipped at :math:`10^{-37}`."""
    return (img1 * 2).pow(a) * (img2 * 2).clamp_min(1e-37).pow(b) / 2


def _level(severity: float, maxval: float, generator: Generator) -> float:
    """AugMix's magnitude: ``U(0.1, severity) * maxval / 10``."""
    return uniform(generator, 0.1, severity) * maxval / 10


def _signed(value: float, generator: Generator) -> float:
    return -value if uniform(generator) < 0.5 else value


def augment(img: Tensor, severity: float = 3, all_ops: bool = False, generator: Generator = None) -> Tensor:
    """One AugMix operation, chosen uniformly, on a float ``C x H x W`` image in ``[0, 1]``; result in ``[0, 1]``."""
    h, w = img.shape[-2:]
    g = generator

    def affine(translate: tuple[float, float] = (0.0, 0.0), shear: tuple[float, float] = (0.0, 0.0)) -> Tensor:
        return TF.affine(img, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear))

    def shear_degrees() -> float:
        return math.degrees(math.atan(_signed(_level(severity, 0.3, g), g)))

    ops: list[Callable[[], Tensor]] = [
        lambda: TF.autocontrast(img),
        lambda: TF.equalize(img),
        lambda: TF.posterize(TF.to_dtype(img, torch.uint8, scale=True), 4 - int(_level(severity, 4, g))),
        lambda: TF.rotate(img, _signed(float(int(_level(severity, 30, g))), g)),
        lambda: TF.solarize(img, (256 - int(_level(severity, 256, g))) / 256),
        lambda: affine(shear=(shear_degrees(), 0.0)),
        lambda: affine(shear=(0.0, shear_degrees())),
        lambda: affine(translate=(_signed(float(int(_level(severity, w / 3, g))), g), 0.0)),
        lambda: affine(translate=(0.0, _signed(float(int(_level(severity, h / 3, g))), g))),
    ]
    if all_ops:
        enhancers = (TF.adjust_saturation, TF.adjust_contrast, TF.adjust_brightness, TF.adjust_sharpness)
        ops += [lambda fn=fn: fn(img, _level(severity, 1.8, g) + 0.1) for fn in enhancers]  # type: ignore[misc]
    out = ops[randint(g, 0, len(ops) - 1)]()
    return TF.to_dtype(out, torch.float32, scale=True).clamp(0, 1)


def _picture(item: Any) -> Any:
    """The image of a mixing-set item (``(image, label)`` tuples are accepted)."""
    return item[0] if isinstance(item, tuple | list) else item


class PixMix:
    """PixMix as a torchvision-style transform: ``PixMix(mixing_set)(img)`` mixes ``img`` with a random picture of
    ``mixing_set`` (module docstring).

    Images may be PIL images or ``C x H x W`` tensors (``uint8`` or float in ``[0, 1]``); the result is a float32
    tensor of the same shape, in ``[0, 1]`` unless ``mean`` and ``std`` normalize it. Mixing pictures are resized
    to the image (apply a random crop to the mixing set yourself, as the authors do, if you want one) and gray ones
    repeated to its channels.

    :param mixing_set: a sequence (e.g. a dataset) of pictures or ``(picture, label)`` pairs
    :param beta: :math:`\\beta` of the mixing weights
    :param aug_severity: severity of the AugMix operations
    :param k: most mixing rounds; each image gets :math:`r \\sim U\\{0, \\ldots, k\\}`
    :param all_ops: also use color, contrast, brightness and sharpness
    :param mean: per-channel mean to subtract at the end (with ``std``); ``None``: no normalization
    :param std: per-channel standard deviation to divide by
    :param generator: random source (default: torch's global one, seeded per DataLoader worker)
    """

    def __init__(
        self,
        mixing_set: Sequence[Any],
        beta: float = 3,
        aug_severity: float = 3,
        k: int = 4,
        all_ops: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        generator: Generator = None,
    ) -> None:
        if len(mixing_set) == 0:
            raise ValueError("the mixing set is empty")
        if beta <= 0 or k < 0 or aug_severity < 0.1:
            raise ValueError(f"need beta > 0, k >= 0 and aug_severity >= 0.1, got {beta}, {k}, {aug_severity}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.mixing_set = mixing_set
        self.beta, self.aug_severity, self.k, self.all_ops = float(beta), float(aug_severity), int(k), all_ops
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.generator = generator

    def __call__(self, img: Any) -> Tensor:
        """``img`` mixed with a picture drawn uniformly from the mixing set."""
        picture = _picture(self.mixing_set[randint(self.generator, 0, len(self.mixing_set) - 1)])
        return self.mix(img, picture)

    def augment(self, img: Tensor) -> Tensor:
        """One AugMix operation at this transform's severity."""
        return augment(img, self.aug_severity, self.all_ops, self.generator)

    def mix(self, orig: Any, mixing_picture: Any) -> Tensor:
        """PixMix of ``orig`` with the given ``mixing_picture`` (Algorithm 1)."""
        g = self.generator
        x = to_float_image(orig)
        picture = match_channels(to_float_image(mixing_picture), x.shape[0])
        if picture.shape[-2:] != x.shape[-2:]:
            picture = TF.resize(picture, list(x.shape[-2:]), antialias=True).clamp(0, 1)
        mixed = self.augment(x) if uniform(g) < 0.5 else x
        for _ in range(randint(g, 0, self.k)):
            other = self.augment(x) if uniform(g) < 0.5 else picture
            mix_op = add_mix if uniform(g) < 0.5 else multiply_mix
            mixed = mix_op(mixed, other, *beta_ab(self.beta, g)).clamp(0, 1)
        if self.mean is not None and self.std is not None:
            mixed = TF.normalize(mixed, self.mean, self.std)
        return mixed


class PixMixDataset(Dataset[tuple[Tensor, Any]]):
    """A dataset of ``(image, label)`` whose images go through :class:`PixMix` (pytorch-ood's ``PixMixDataset``).

    pytorch-ood 0.4.0 normalizes with ``mean`` and ``std`` of ones by default, which shifts the pixels to
    :math:`[-1, 0]`; here the default is no normalization (pixels in :math:`[0, 1]`); pass the statistics of the
    data to standardize.

    :param dataset: returns ``(image, label)``; images as for :class:`PixMix`
    :param mixing_set: pictures or ``(picture, label)`` pairs (labels ignored)
    :param beta: see :class:`PixMix`; :param aug_severity: see :class:`PixMix`; :param k: see :class:`PixMix`
    :param std: see :class:`PixMix`; :param mean: see :class:`PixMix`; :param all_ops: see :class:`PixMix`
    :param generator: see :class:`PixMix`
    """

    def __init__(
        self,
        dataset: Sequence[tuple[Any, Any]],
        mixing_set: Sequence[Any],
        beta: float = 3,
        aug_severity: float = 3,
        k: int = 4,
        std: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        all_ops: bool = False,
        generator: Generator = None,
    ) -> None:
        self.dataset = dataset
        self.pixmix = PixMix(mixing_set, beta, aug_severity, k, all_ops, mean, std, generator)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        x, y = self.dataset[index]
        return self.pixmix(x), y
