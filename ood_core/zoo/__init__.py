"""Pretrained networks for the embedded digits benchmark: a CNN classifier and a fully-convolutional segmenter,
trained by ``python -m ood_core.zoo.train`` and shipped as safetensors in ``ood_core/zoo/weights/``."""

from ood_core.zoo.models import DIGITS_MEAN, DIGITS_STD, DigitsCNN, DigitsSegmenter, normalize
from ood_core.zoo.weights_io import (
    CLASSIFIER_WEIGHTS,
    SEGMENTER_WEIGHTS,
    WEIGHTS_DIR,
    WeightsMismatchError,
    default_device,
    load_classifier,
    load_segmenter,
    load_weights,
    save_weights,
)

__all__ = [
    "CLASSIFIER_WEIGHTS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "SEGMENTER_WEIGHTS",
    "WEIGHTS_DIR",
    "DigitsCNN",
    "DigitsSegmenter",
    "WeightsMismatchError",
    "default_device",
    "load_classifier",
    "load_segmenter",
    "load_weights",
    "normalize",
    "save_weights",
]
