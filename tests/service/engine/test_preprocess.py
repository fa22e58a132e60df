"""The one preprocessing path: hand-computed normalisation, conversion, resize and crop."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from service.engine.preprocess import Preprocessor
from service.settings import PreprocessConfig


def test_preprocessing_normalizes_hand_computed_values() -> None:
    pre = Preprocessor(PreprocessConfig(mode="L", mean=[0.5], std=[0.25]), (2, 2))
    pixels = pre.pixels(Image.fromarray(np.array([[0, 255], [51, 204]], dtype=np.uint8)))
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 2, 2)
    out = pre.normalize(pixels[None])
    # (x / 255 - 0.5) / 0.25: 0 -> -2, 255 -> 2, 51 -> -1.2, 204 -> 1.2
    assert torch.allclose(out[0, 0], torch.tensor([[-2.0, 2.0], [-1.2, 1.2]]), atol=1e-6)


def test_preprocessing_converts_resizes_and_crops() -> None:
    pre = Preprocessor(PreprocessConfig(mode="RGB", resize=(10, 12), crop=(4, 6)), (4, 6))
    gray = Image.fromarray(np.full((30, 7), 9, dtype=np.uint8))
    pixels = pre.pixels(gray)
    assert pixels.shape == (3, 4, 6) and int(pixels.min()) == int(pixels.max()) == 9
    stripes = np.zeros((10, 12), dtype=np.uint8)
    stripes[:, 3:9] = 200  # exactly the central 6 columns: the crop keeps only them
    assert (
        int(
            Preprocessor(PreprocessConfig(mode="L", resize=(10, 12), crop=(4, 6), mean=[0], std=[1]), (4, 6))
            .pixels(Image.fromarray(stripes))
            .min()
        )
        == 200
    )
