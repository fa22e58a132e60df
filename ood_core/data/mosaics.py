"""Segmentation variant of the digits benchmark: 64x64 mosaics of four 32x32 digits with per-pixel labels.

Each mosaic is a 2x2 grid (quadrants top-left, top-right, bottom-left, bottom-right) of digits from
:mod:`ood_core.data.digits`. Pixel labels: ``0`` = background (pixel value below :data:`BACKGROUND_THRESHOLD`),
``1..6`` = ID digit classes 0..5 (class + 1), ``-1`` = pixels of a near-OOD digit (6-9). A chosen share of the
mosaics contains exactly one OOD digit (in a random quadrant); the others contain only ID digits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.data.digits import (
    ID_SPLITS,
    IMAGE_SIZE,
    NUM_CLASSES,
    OOD_LABEL,
    load_split,
    near_ood_digit_classes,
)

MOSAIC_SIZE = 2 * IMAGE_SIZE
BACKGROUND_THRESHOLD = 0.25
"""A pixel whose value is below this is background (label 0), whatever digit it belongs to."""
BACKGROUND_LABEL = 0
NUM_SEGMENTATION_CLASSES = 7
"""Background plus the six ID digit classes."""


def make_mosaics_with_digits(
    n: int,
    ood_share: float = 0.5,
    seed: int = 0,
    split: str = "test",
    threshold: float = BACKGROUND_THRESHOLD,
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`make_mosaics`, also returning the placed digits' original classes (0..9) as ``n x 4``
    (quadrant order: top-left, top-right, bottom-left, bottom-right)."""
    if split not in ID_SPLITS:
        raise ValueError(f"split must be one of {ID_SPLITS}, got {split!r}")
    if not 0.0 <= ood_share <= 1.0:
        raise ValueError(f"ood_share must be in [0, 1], got {ood_share}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    id_images, id_classes = load_split(split, seed=seed)
    ood_images, _ = load_split("near_ood", seed=seed)
    ood_classes = near_ood_digit_classes()
    generator = torch.Generator().manual_seed(seed * 1000 + 404 + ID_SPLITS.index(split))

    id_pick = torch.randint(len(id_classes), (n, 4), generator=generator)
    tiles, classes = id_images[id_pick], id_classes[id_pick]  # n x 4 x 1 x 32 x 32, n x 4
    num_with_ood = round(ood_share * n)
    with_ood = torch.randperm(n, generator=generator)[:num_with_ood]
    quadrant = torch.randint(4, (num_with_ood,), generator=generator)
    ood_pick = torch.randint(len(ood_classes), (num_with_ood,), generator=generator)
    tiles[with_ood, quadrant] = ood_images[ood_pick]
    classes[with_ood, quadrant] = ood_classes[ood_pick]

    tile_labels = torch.where(classes < NUM_CLASSES, classes + 1, torch.full_like(classes, OOD_LABEL))
    foreground = tiles[:, :, 0] >= threshold  # n x 4 x 32 x 32
    pixel_labels = torch.where(foreground, tile_labels[:, :, None, None], BACKGROUND_LABEL)
    return _assemble(tiles[:, :, 0]).unsqueeze(1), _assemble(pixel_labels), classes


def make_mosaics(
    n: int,
    ood_share: float = 0.5,
    seed: int = 0,
    split: str = "test",
    threshold: float = BACKGROUND_THRESHOLD,
) -> tuple[Tensor, Tensor]:
    """``n`` seeded 64x64 digit mosaics and their per-pixel labels.

    Args:
        n: number of mosaics.
        ood_share: share of the mosaics (rounded to a count) that contain one near-OOD digit (6-9).
        seed: seeds the ID split and the draw; same arguments give the same tensors.
        split: ID split the digits 0-5 are drawn from (``"train"`` to train a segmenter, ``"test"`` to
            evaluate); OOD digits come from ``near_ood``.
        threshold: pixels below it are background.
    Returns:
        images ``n x 1 x 64 x 64`` float32 in [0, 1] and labels ``n x 64 x 64`` int64 in {-1, 0, 1..6}.
    """
    images, labels, _ = make_mosaics_with_digits(n, ood_share=ood_share, seed=seed, split=split, threshold=threshold)
    return images, labels


def _assemble(tiles: Tensor) -> Tensor:
    """``n x 4 x h x w`` quadrants (TL, TR, BL, BR) -> ``n x 2h x 2w``."""
    n, _, h, w = tiles.shape
    return tiles.reshape(n, 2, 2, h, w).permute(0, 1, 3, 2, 4).reshape(n, 2 * h, 2 * w)
