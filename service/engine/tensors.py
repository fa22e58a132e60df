"""Pixel tensors sent already decoded (the Open Inference Protocol's ``UINT8`` / ``FP32`` inputs) -> the engine's
decoded images (:data:`service.engine.submit.Decoded`), ready for :func:`service.engine.submit.submit`.

A batch ``N x C x H x W`` with C = 1 (grayscale) or 3 (RGB), before the model's normalization: ``uint8`` levels,
or float intensities in [0, 1] quantized to 8 bits as ``round(v * 255)`` (exactly as
:meth:`~service.engine.preprocess.Preprocessor.pixels_from_tensor` and a PNG of them would). Each image then takes
the one preprocessing path of decoded files (:meth:`~service.engine.preprocess.Preprocessor.pixels`: mode
conversion, bilinear resize, center crop), so a pixel tensor and the PNG of the same levels score the same.

Float intensities outside [0, 1] (e.g. 0..255 sent as FP32) and NaN are refused rather than clipped: clipping
would score a white image. As with files, each image's ``H x W`` is checked against the pixel limit first, and a
large batch is prepared in the thread pool (at most one request per CPU, :attr:`ServedModel.decode_slots`).
"""

from __future__ import annotations

import asyncio

import numpy as np
from PIL import Image

from service.engine.served_model import ServedModel
from service.engine.submit import Decoded
from service.errors import BadRequestError, ImageTooLargeError

INLINE_PIXELS = 8192
"""Largest batch (its pixels + the model input pixels, over all its images) prepared on the event loop."""


def check_pixels(array: np.ndarray, max_pixels: int, name: str = "pixels") -> None:
    """Shape ``N x C x H x W`` (N, H, W >= 1; C = 1 or 3), ``uint8`` or float in [0, 1] without NaN, ``H x W``
    within ``max_pixels``."""
    if array.ndim != 4:
        raise BadRequestError(f"{name} must have shape [N, C, H, W], got {list(array.shape)}")
    count, channels, height, width = (int(d) for d in array.shape)
    if channels not in (1, 3):
        raise BadRequestError(f"{name} must have 1 (grayscale) or 3 (RGB) channels, got {channels}")
    if min(count, height, width) < 1:
        raise BadRequestError(f"{name} must have at least one image of at least 1x1 pixels, got {list(array.shape)}")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {height}x{width} images have {height * width} pixels; the limit is {max_pixels}"
        )
    if array.dtype == np.uint8:
        return
    if array.dtype.kind != "f":
        raise BadRequestError(f"{name} must be uint8 levels or float intensities, got {array.dtype}")
    low, high = float(np.min(array)), float(np.max(array))
    if not (low >= 0.0 and high <= 1.0):  # NaN fails both comparisons
        raise BadRequestError(
            f"{name}: float pixels are intensities in [0, 1] (before the model's normalization), got values in "
            f"[{low}, {high}]; send UINT8 for 0..255 levels"
        )


def _levels(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    return np.rint(array.astype(np.float32) * np.float32(255.0)).astype(np.uint8)


def _prepare(model: ServedModel, array: np.ndarray) -> Decoded:
    out = []
    for image in _levels(array):
        channels, height, width = image.shape
        if channels == 1:
            pil = Image.fromarray(np.ascontiguousarray(image[0]))  # 2-D uint8: mode L
        else:
            pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))  # H x W x 3 uint8: RGB
        out.append((model.preprocessor.pixels(pil), (int(height), int(width))))
    return out


async def decode_pixels(model: ServedModel, array: np.ndarray, max_pixels: int) -> Decoded:
    """Check ``array`` (:func:`check_pixels`) and bring each image to the model's input: per image the ``uint8``
    pixels and its ``(height, width)``. Small batches on the event loop, larger ones in the thread pool."""
    check_pixels(array, max_pixels)
    count, _channels, height, width = array.shape
    input_height, input_width = model.config.input_size
    if count * (height * width + input_height * input_width) <= INLINE_PIXELS:
        return _prepare(model, array)
    async with model.decode_slots:
        return await asyncio.get_running_loop().run_in_executor(None, _prepare, model, array)
