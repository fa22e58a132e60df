"""InsertCOCO / CocoOutliers on a generated miniature COCO directory: image selection, polygon and RLE masks, and
pasted pixels labeled OOD. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ood_core.augment import CocoOutliers, InsertCOCO
from ood_core.augment.coco import polygons_to_mask, rle_to_mask


def make_coco(root: Path) -> Path:
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [
        {"id": 1, "file_name": "000000000001.png", "height": 60, "width": 80},  # usable: a polygon object
        {"id": 2, "file_name": "000000000002.png", "height": 60, "width": 80},  # has a "train": excluded
        {"id": 3, "file_name": "000000000003.png", "height": 20, "width": 80},  # too small
        {"id": 4, "file_name": "000000000004.png", "height": 60, "width": 60},  # usable: an RLE object
        {"id": 5, "file_name": "000000000005.png", "height": 60, "width": 60},  # no annotation
    ]
    for info in images:
        pixels = np.zeros((info["height"], info["width"], 3), dtype=np.uint8)
        pixels[..., 1] = 255  # green everywhere
        Image.fromarray(pixels).save(root / "train2017" / info["file_name"])
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    rle = {"counts": [60 * 20, 60 * 10, 60 * 30], "size": [60, 60]}  # columns 20..29 are the object
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "segmentation": square, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 5, "image_id": 4, "category_id": 1, "segmentation": rle, "iscrowd": 1},
    ]
    categories = [
        {"id": 1, "name": "elephant", "supercategory": "animal"},
        {"id": 2, "name": "train", "supercategory": "vehicle"},
    ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


def test_masks_from_polygons_and_column_major_rle() -> None:
    mask = polygons_to_mask([[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0]], 5, 5)
    assert mask.sum() == 9 and mask[1:4, 1:4].all()
    rle = rle_to_mask([2, 3, 1], 2, 3)  # column-major: (0,0) (1,0) off, (0,1) (1,1) (0,2) on, (1,2) off
    np.testing.assert_array_equal(rle, [[False, True, True], [False, True, False]])
    with pytest.raises(ValueError):
        rle_to_mask([1, 1], 2, 3)


def test_coco_outliers_select_usable_images(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    outliers = CocoOutliers(root, exclude_classes="bddAnomaly", min_img_size=40)
    assert [info["id"] for info in outliers.images] == [1, 4]
    img, mask = outliers[0]
    assert img.shape == (3, 60, 80) and mask.dtype == torch.bool
    assert int(mask.sum()) == 21 * 21 and bool(mask[10:31, 10:31].all())
    _, rle_mask = outliers[1]
    assert int(rle_mask.sum()) == 600 and bool(rle_mask[:, 20:30].all())
    assert len(CocoOutliers(root, min_img_size=40)) == 3  # nothing excluded
    with pytest.raises(ValueError, match="preset"):
        CocoOutliers(root, exclude_classes="nonexistent")
    with pytest.raises(FileNotFoundError):
        CocoOutliers(tmp_path / "missing")


def test_insert_coco_labels_pasted_pixels_ood(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    insert = InsertCOCO(
        root, p=1.0, exclude_classes=["train"], min_img_size=40, generator=torch.Generator().manual_seed(0)
    )
    img = Image.fromarray(np.zeros((120, 160, 3), dtype=np.uint8))
    target = np.ones((120, 160), dtype=np.uint8)
    out, out_target = insert(img, target)
    pasted = out_target.numpy() == -1
    assert isinstance(out, Image.Image) and out_target.dtype == torch.int64 and pasted.any()
    pixels = np.asarray(out)
    assert (pixels[pasted][:, 1] > 200).all() and (pixels[~pasted] == 0).all()  # green object, black elsewhere
    assert (out_target.numpy()[~pasted] == 1).all()
    with pytest.raises(ValueError, match="never downloads"):
        InsertCOCO(root, download=True)
