"""Embedded data sets: the open-set digits benchmark (classification and segmentation), built from data that ships
with scikit-learn, so nothing is downloaded."""

from ood_core.data.digits import (
    ID_CLASSES,
    ID_SPLITS,
    IMAGE_SIZE,
    NEAR_OOD_CLASSES,
    NUM_CLASSES,
    OOD_LABEL,
    OOD_SPLITS,
    SPLITS,
    DigitsDataset,
    load_split,
    near_ood_digit_classes,
    split_indices,
)
from ood_core.data.mosaics import (
    BACKGROUND_LABEL,
    BACKGROUND_THRESHOLD,
    MOSAIC_SIZE,
    NUM_SEGMENTATION_CLASSES,
    make_mosaics,
    make_mosaics_with_digits,
)

__all__ = [
    "BACKGROUND_LABEL",
    "BACKGROUND_THRESHOLD",
    "ID_CLASSES",
    "ID_SPLITS",
    "IMAGE_SIZE",
    "MOSAIC_SIZE",
    "NEAR_OOD_CLASSES",
    "NUM_CLASSES",
    "NUM_SEGMENTATION_CLASSES",
    "OOD_LABEL",
    "OOD_SPLITS",
    "SPLITS",
    "DigitsDataset",
    "load_split",
    "make_mosaics",
    "make_mosaics_with_digits",
    "near_ood_digit_classes",
    "split_indices",
]
