"""COCO objects as outliers for :class:`~ood_core.augment.pasting.OutlierPaste` (pytorch-ood's ``InsertCOCO``), read
from a local copy of COCO: ``coco_dir/annotations/instances_train{year}.json`` and ``coco_dir/train{year}/*.jpg``.
Nothing is downloaded: fetch COCO yourself.

Object masks are decoded from the annotations' polygons and uncompressed RLE (``iscrowd`` annotations in the
instance files); compressed (string) RLE, which only result files use, is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ood_core.augment.images import to_float_image
from ood_core.augment.pasting import DEFAULT_UPSCALE, OutlierPaste

#: COCO classes that overlap with the classes of segmentation benchmarks (pytorch-ood's presets)
CLASS_EXCLUSIONS: dict[str, list[str]] = {
    "bddAnomaly": ["train", "bicycle", "motorcycle"],
    "Streethazards": [
        "traffic light",
        "stop sign",
        "vase",
        "refrigerator",
        "sink",
        "toaster",
        "oven",
        "dining table",
        "chair",
        "tennis racket",
    ],
}


def rle_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Boolean ``height x width`` mask of COCO's uncompressed RLE: alternating runs of 0 and 1, starting with 0,
    over the pixels in column-major order.

    :raises ValueError: if the runs do not cover the image exactly
    """
    runs = np.asarray(counts, dtype=np.int64)
    if runs.sum() != height * width:
        raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, the image has {height * width}")
    values = np.arange(runs.size) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Boolean ``height x width`` mask of COCO polygons (``[x1, y1, x2, y2, ...]`` each)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6 and len(polygon) % 2 == 0:
            draw.polygon([(float(x), float(y)) for x, y in zip(polygon[::2], polygon[1::2], strict=True)], fill=1)
    return np.asarray(canvas, dtype=bool)


def annotation_mask(annotation: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """The object mask of one COCO annotation, or ``None`` for compressed RLE."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return rle_to_mask(segmentation["counts"], height, width)
    return None


class CocoOutliers(Sequence[tuple[Tensor, Tensor]]):
    """The usable COCO images as ``(image, mask)`` cut-outs: images at least ``min_img_size`` pixels high and wide,
    with an annotated object, and without an object of ``exclude_classes``. The mask of an image is the union of
    its first ``annotation_per_image`` annotations.

    :param coco_dir: the COCO root (see the module docstring)
    :param exclude_classes: COCO class names, or the name of a preset in :data:`CLASS_EXCLUSIONS`
    :param annotation_per_image: annotations merged into one cut-out
    :param year: the COCO release (its file names)
    :param min_img_size: smallest height and width of a used image
    :raises FileNotFoundError: without the annotation file or the image folder
    :raises ValueError: on an unknown preset
    """

    def __init__(
        self,
        coco_dir: str | Path,
        exclude_classes: Sequence[str] | str | None = None,
        annotation_per_image: int = 1,
        year: int = 2017,
        min_img_size: int = 480,
    ) -> None:
        root = Path(coco_dir)
        annotation_file = root / "annotations" / f"instances_train{year}.json"
        self.images_dir = root / f"train{year}"
        if not annotation_file.is_file() or not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"COCO not found: need {annotation_file} and {self.images_dir} (nothing is downloaded)"
            )
        if isinstance(exclude_classes, str):
            if exclude_classes not in CLASS_EXCLUSIONS:
                raise ValueError(f"unknown preset {exclude_classes!r}; presets: {sorted(CLASS_EXCLUSIONS)}")
            exclude_classes = CLASS_EXCLUSIONS[exclude_classes]
        self.exclude_classes = list(exclude_classes or [])
        self.annotation_per_image = int(annotation_per_image)
        with annotation_file.open(encoding="utf-8") as f:
            data = json.load(f)
        excluded_ids = {c["id"] for c in data.get("categories", []) if c["name"] in self.exclude_classes}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data.get("annotations", []):
            by_image.setdefault(ann["image_id"], []).append(ann)
        present = {p.name for p in self.images_dir.iterdir()}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[list[dict[str, Any]]] = []
        for info in sorted(data.get("images", []), key=lambda i: i["id"]):
            anns = by_image.get(info["id"], [])
            if (
                anns
                and info.get("file_name") in present
                and min(info["height"], info["width"]) >= min_img_size
                and not any(ann["category_id"] in excluded_ids for ann in anns)
            ):
                self.images.append(info)
                self.annotations.append(anns)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        info = self.images[index]
        height, width = info["height"], info["width"]
        mask = np.zeros((height, width), dtype=bool)
        for ann in self.annotations[index][: self.annotation_per_image]:
            ann_mask = annotation_mask(ann, height, width)
            if ann_mask is not None:
                mask |= ann_mask
        with Image.open(self.images_dir / info["file_name"]) as image:
            img = to_float_image(image.convert("RGB"))
        if img.shape[-2:] != (height, width):
            raise ValueError(f"{info['file_name']} is {tuple(img.shape[-2:])}, its annotation says {(height, width)}")
        return img, torch.from_numpy(mask)


class InsertCOCO(OutlierPaste):
    """Paste COCO objects into segmentation samples, their pixels labeled ``ood_mask_value`` (pytorch-ood's
    ``InsertCOCO``, same arguments): an :class:`~ood_core.augment.pasting.OutlierPaste` over
    :class:`CocoOutliers`, objects scaled by :math:`U(0.2, 0.5) \\cdot` ``upscale`` of their size.

    .. code-block:: python

        insert_coco = InsertCOCO("data/coco", exclude_classes="Streethazards", p=0.1)
        img, mask = insert_coco(img, mask)  # mask: int64, pasted pixels = -1

    :param coco_dir: see :class:`CocoOutliers`
    :param p: probability of pasting into an image
    :param n: objects per pasted image
    :param exclude_classes: see :class:`CocoOutliers`
    :param annotation_per_image: see :class:`CocoOutliers`
    :param ood_mask_value: target value of pasted pixels
    :param upscale: factor on the relative size range ``(0.2, 0.5)``
    :param year: see :class:`CocoOutliers`
    :param min_img_size: see :class:`CocoOutliers`
    :param download: must be ``False``: nothing is downloaded
    :param generator: random source
    :raises ValueError: for ``download=True``
    """

    def __init__(
        self,
        coco_dir: str | Path,
        p: float = 0.1,
        n: int = 1,
        exclude_classes: Sequence[str] | str | None = None,
        annotation_per_image: int = 1,
        ood_mask_value: int = -1,
        upscale: float = DEFAULT_UPSCALE,
        year: int = 2017,
        min_img_size: int = 480,
        download: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if download:
            raise ValueError("InsertCOCO never downloads: place COCO's train images and annotations under coco_dir")
        outliers = CocoOutliers(coco_dir, exclude_classes, annotation_per_image, year, min_img_size)
        super().__init__(outliers, p, n, ood_mask_value, (0.2 * upscale, 0.5 * upscale), generator=generator)
