"""The embedded open-set benchmark built from scikit-learn's bundled data (no download).

* In-distribution (ID): handwritten digits 0-5 of ``sklearn.datasets.load_digits`` (UCI optical digits,
  Alpaydin & Kaynak 1998), split stratified and seeded into ``train`` / ``calibration`` / ``test``.
  ``calibration`` is ID data held out of both detector fitting and testing (for thresholds / p-values).
* Near-OOD: digits 6-9 (``near_ood``), label ``-1``.
* Far-OOD: ``gaussian`` (N(0.5, 0.25^2) noise clipped to [0, 1]), ``uniform`` (U[0, 1] noise) and
  ``sample_images`` (random grayscale crops of ``sklearn.datasets.load_sample_images``), label ``-1``.

Every image is ``float32`` in [0, 1] with shape ``1 x 32 x 32``: the 8x8 digits (values 0..16) are divided by 16
and resized bilinearly to 32x32. Labels are ``int64``; OOD labels are ``-1`` (the pytorch-ood convention: < 0 is
OOD). Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_SIZE = 32
ID_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
NEAR_OOD_CLASSES: tuple[int, ...] = (6, 7, 8, 9)
NUM_CLASSES = len(ID_CLASSES)
OOD_LABEL = -1
ID_SPLITS: tuple[str, ...] = ("train", "calibration", "test")
OOD_SPLITS: tuple[str, ...] = ("near_ood", "gaussian", "uniform", "sample_images")
SPLITS: tuple[str, ...] = ID_SPLITS + OOD_SPLITS
CALIBRATION_FRACTION = 0.15
TEST_FRACTION = 0.25
NUM_FAR_OOD = 500
"""Default number of images in each synthetic far-OOD set (``gaussian``, ``uniform``, ``sample_images``)."""


def resize_to(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Bilinear resize of ``N x 1 x h x w`` images to ``N x 1 x size x size`` (``align_corners=False``),
    clamped to [0, 1]."""
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return resized.clamp_(0.0, 1.0)


@lru_cache(maxsize=1)
def _all_digits() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``N x 1 x 32 x 32`` float32 in [0, 1] and their ``int64`` classes 0..9."""
    bunch = load_digits()
    raw = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return resize_to(raw), torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))


@lru_cache(maxsize=8)
def _id_split_indices(seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded indices (into the full digits set) of the three ID splits; disjoint and sorted."""
    _, classes = _all_digits()
    labels = classes.numpy()
    id_index = np.flatnonzero(np.isin(labels, ID_CLASSES))
    rest, test = train_test_split(
        id_index, test_size=TEST_FRACTION, stratify=labels[id_index], random_state=seed, shuffle=True
    )
    calibration_share = CALIBRATION_FRACTION / (1.0 - TEST_FRACTION)
    train, calibration = train_test_split(
        rest, test_size=calibration_share, stratify=labels[rest], random_state=seed + 1, shuffle=True
    )
    return {"train": np.sort(train), "calibration": np.sort(calibration), "test": np.sort(test)}


def split_indices(seed: int = 0) -> dict[str, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` of the ``train`` / ``calibration`` / ``test`` ID splits."""
    return {name: index.copy() for name, index in _id_split_indices(seed).items()}


def _gaussian_noise(n: int, generator: torch.Generator) -> Tensor:
    noise = 0.5 + 0.25 * torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return noise.clamp_(0.0, 1.0)


def _uniform_noise(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


@lru_cache(maxsize=1)
def _grayscale_sample_images() -> tuple[Tensor, ...]:
    """The photos bundled with scikit-learn (``china.jpg``, ``flower.jpg``) as ``1 x H x W`` in [0, 1],
    converted with the ITU-R 601 luma weights 0.299 R + 0.587 G + 0.114 B."""
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    photos = load_sample_images().images
    return tuple(torch.as_tensor(np.asarray(photo, dtype=np.float32) @ luma / 255.0).unsqueeze(0) for photo in photos)


def _sample_image_crops(n: int, generator: torch.Generator) -> Tensor:
    """``n`` random square crops (side 24..160 px) of the grayscale sample photos, resized to 32x32."""
    photos = _grayscale_sample_images()
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        _, height, width = photo.shape
        side = int(torch.randint(24, 161, (1,), generator=generator))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        crops.append(resize_to(photo[None, :, top : top + side, left : left + side]))
    return torch.cat(crops)


_FAR_OOD_OFFSETS = {"gaussian": 101, "uniform": 202, "sample_images": 303}
_FAR_OOD_MAKERS = {"gaussian": _gaussian_noise, "uniform": _uniform_noise, "sample_images": _sample_image_crops}


def load_split(name: str, seed: int = 0, num_far_ood: int = NUM_FAR_OOD) -> tuple[Tensor, Tensor]:
    """Images ``N x 1 x 32 x 32`` (float32, [0, 1]) and labels ``N`` (int64) of one split.

    Args:
        name: one of :data:`SPLITS`: ``"train"``, ``"calibration"``, ``"test"`` (ID, labels 0..5),
            ``"near_ood"`` (digits 6-9), ``"gaussian"``, ``"uniform"``, ``"sample_images"`` (labels ``-1``).
        seed: seeds the ID split and the synthetic far-OOD sets; the same seed gives the same tensors.
        num_far_ood: number of images of the synthetic far-OOD sets (ignored by the digit splits).
    Returns:
        fresh tensors (callers may modify them).
    """
    if name in ID_SPLITS:
        images, classes = _all_digits()
        index = torch.as_tensor(_id_split_indices(seed)[name])
        return images[index].clone(), classes[index].clone()
    if name == "near_ood":
        images, classes = _all_digits()
        mask = torch.isin(classes, torch.tensor(NEAR_OOD_CLASSES))
        return images[mask].clone(), torch.full((int(mask.sum()),), OOD_LABEL, dtype=torch.int64)
    if name in _FAR_OOD_MAKERS:
        generator = torch.Generator().manual_seed(seed * 1000 + _FAR_OOD_OFFSETS[name])
        images = _FAR_OOD_MAKERS[name](num_far_ood, generator)
        return images.float(), torch.full((num_far_ood,), OOD_LABEL, dtype=torch.int64)
    raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")


def near_ood_digit_classes() -> Tensor:
    """The original digit classes (6..9) of the ``near_ood`` images, in the order :func:`load_split` returns them."""
    _, classes = _all_digits()
    return classes[torch.isin(classes, torch.tensor(NEAR_OOD_CLASSES))].clone()


class DigitsDataset(Dataset[tuple[Tensor, Tensor]]):
    """A map-style ``Dataset`` over one split: item ``i`` is ``(image 1x32x32 float32, label int64 scalar)``,
    with OOD labels ``-1``. ``transform`` (optional) is applied to each image."""

    def __init__(
        self,
        split: str,
        seed: int = 0,
        num_far_ood: int = NUM_FAR_OOD,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.split = split
        self.images, self.labels = load_split(split, seed=seed, num_far_ood=num_far_ood)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]
