"""Pixel tensors into the engine (:mod:`service.engine.tensors`): the same pixels as the documented paths
(``Preprocessor.pixels_from_tensor`` for [0, 1] floats, ``Preprocessor.pixels`` of the PNG for levels), on the
event loop and in the thread pool, and the input rules."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.preprocess import Preprocessor
from service.engine.tensors import INLINE_PIXELS, check_pixels, decode_pixels
from service.errors import BadRequestError, ImageTooLargeError
from service.settings import PreprocessConfig


def _model(size: tuple[int, int], resize: tuple[int, int] | None = None) -> Any:
    """What :func:`decode_pixels` reads of a grayscale served model: input size, preprocessor, decode slots."""
    config = PreprocessConfig(mode="L", resize=resize, crop=size if resize else None, mean=[0.5], std=[0.5])
    preprocessor = Preprocessor(config, size)
    return SimpleNamespace(
        config=SimpleNamespace(input_size=size), preprocessor=preprocessor, decode_slots=asyncio.Semaphore(1)
    )


@pytest.mark.parametrize("count", [1, 40], ids=["event-loop", "thread-pool"])
def test_float_intensities_give_the_pixels_of_pixels_from_tensor(count: int) -> None:
    model = _model((8, 8), resize=(12, 10))  # resized and center-cropped
    images = np.random.default_rng(0).random((count, 1, 20, 16), dtype=np.float32)
    assert (count * (20 * 16 + 64) <= INLINE_PIXELS) == (count == 1)
    decoded = asyncio.run(decode_pixels(model, images, max_pixels=10_000))
    expected = model.preprocessor.pixels_from_tensor(torch.from_numpy(images))
    assert [size for _, size in decoded] == [(20, 16)] * count
    for (pixels, _), want in zip(decoded, expected, strict=True):
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, want)


def test_uint8_levels_score_like_the_png_of_them_and_rgb_becomes_the_models_mode() -> None:
    model = _model((6, 6))
    rgb = np.random.default_rng(1).integers(0, 256, (2, 3, 9, 7), dtype=np.uint8)
    decoded = asyncio.run(decode_pixels(model, rgb, max_pixels=100))
    for (pixels, size), image in zip(decoded, rgb, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
        assert size == (9, 7)
        assert torch.equal(pixels, model.preprocessor.pixels(Image.open(buffer)))  # PIL's RGB -> L luma


@pytest.mark.parametrize(
    ("array", "error", "reason"),
    [
        (np.zeros((1, 8, 8), np.uint8), BadRequestError, "[N, C, H, W]"),
        (np.zeros((1, 2, 8, 8), np.uint8), BadRequestError, "channels"),
        (np.zeros((0, 1, 8, 8), np.uint8), BadRequestError, "at least one image"),
        (np.zeros((1, 1, 8, 8), np.int64), BadRequestError, "uint8 levels or float"),
        (np.full((1, 1, 2, 2), 1.0001, np.float32), BadRequestError, "[0, 1]"),
        (np.full((1, 1, 2, 2), -0.5, np.float32), BadRequestError, "[0, 1]"),
        (np.array([[[[0.5, np.nan]]]], np.float32), BadRequestError, "[0, 1]"),
        (np.zeros((1, 1, 11, 10), np.uint8), ImageTooLargeError, "110 pixels"),
    ],
)
def test_check_pixels_refuses_what_is_not_an_image_batch(array: np.ndarray, error: type, reason: str) -> None:
    with pytest.raises(error, match=reason.replace("[", r"\[").replace("]", r"\]")):
        check_pixels(array, max_pixels=100)
    check_pixels(np.ones((2, 3, 10, 10), np.float32), max_pixels=100)  # the limits themselves are fine
