"""Segmentation score maps in the answer: their size (bounded) and their encoding, done in the batch worker.

Size (``?size=``): ``input`` (default) gives the maps at the model's input size, where the network computed them;
``original`` at the size of the image as sent; ``HxW`` at that size. A map may have at most ``max_map_pixels``
pixels (``OOD_MAX_MAP_PIXELS``), and the whole answer at most ``max_response_bytes`` (``OOD_MAX_RESPONSE_MB``,
estimated before any work from :data:`BYTES_PER_PIXEL`): otherwise 413, before anything is computed. A map is
resized bilinearly; ``ood_share`` and ``max_score`` are computed on the map that is returned.

Encodings (:func:`encode_map`): ``png`` 16-bit grayscale, ``score = min + level / 65535 * (max - min)``; ``npy``
a float16 array; ``json`` nested lists of rows. Binary formats are base64 in ``data``.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch import Tensor

from service.errors import BadRequestError, ResponseTooLargeError

MapFormat = Literal["png", "npy", "json"]
MapSize = Literal["input", "original"] | tuple[int, int]
BYTES_PER_PIXEL: dict[str, float] = {"png": 2 * 4 / 3, "npy": 2 * 4 / 3, "json": 24.0}
"""Upper estimates of the encoded bytes per map pixel: 16 bits, base64; a float32 written as JSON ``-0.123...,``."""
_EXPLICIT = re.compile(r"([1-9][0-9]{0,3})x([1-9][0-9]{0,3})")


def parse_map_size(value: str) -> MapSize:
    """``input``, ``original`` or ``HxW`` (400 otherwise)."""
    if value in ("input", "original"):
        return value  # type: ignore[return-value]
    match = _EXPLICIT.fullmatch(value)
    if match is None:
        raise BadRequestError(f"'size' must be 'input', 'original' or HEIGHTxWIDTH (e.g. 512x512), got {value!r}")
    return int(match.group(1)), int(match.group(2))


def map_sizes(
    spec: MapSize,
    input_size: tuple[int, int],
    originals: list[tuple[int, int]],
    detectors: int,
    fmt: MapFormat,
    max_map_pixels: int,
    max_response_bytes: int,
) -> list[tuple[int, int]]:
    """The size of each image's maps; 413 when one is over ``max_map_pixels`` or the answer over its budget."""
    if spec == "input":
        sizes = [tuple(input_size)] * len(originals)
    elif spec == "original":
        sizes = list(originals)
    else:
        sizes = [spec] * len(originals)
    for index, (height, width) in enumerate(sizes):
        if height * width > max_map_pixels:
            raise ResponseTooLargeError(
                f"image {index}: a {height}x{width} map has {height * width} pixels, over the limit of "
                f"{max_map_pixels}; ask for a smaller ?size= (default: the model's input size)"
            )
    estimate = sum(h * w for h, w in sizes) * detectors * BYTES_PER_PIXEL[fmt]
    if estimate > max_response_bytes:
        raise ResponseTooLargeError(
            f"{len(sizes)} image(s) x {detectors} detector(s) of {fmt} maps would be about {estimate / 2**20:.1f} MiB, "
            f"over the response limit of {max_response_bytes / 2**20:.1f} MiB; send fewer images or detectors, or "
            "ask for a smaller ?size= or format=png"
        )
    return [(int(h), int(w)) for h, w in sizes]


def encode_map(scores: Tensor, fmt: MapFormat) -> dict[str, Any]:
    """``{"format", "height", "width", "data", ...}`` (see the module docstring). Non-finite scores (JSON has no
    NaN/Inf) are clipped to the finite range (``json``: ``null``)."""
    array = scores.numpy().astype(np.float32)
    shape = {"height": int(array.shape[0]), "width": int(array.shape[1])}
    finite = np.isfinite(array)
    if not finite.all():
        if fmt == "json":
            rows = [
                [v if ok else None for v, ok in zip(r, f, strict=True)]
                for r, f in zip(array.tolist(), finite.tolist(), strict=True)
            ]
            return {"format": "json", **shape, "data": rows}
        values = array[finite] if finite.any() else np.zeros(1, dtype=np.float32)
        array = np.clip(np.nan_to_num(array, nan=float(values.max())), values.min(), values.max())
    low, high = float(array.min()), float(array.max())
    if fmt == "json":
        return {"format": "json", **shape, "data": array.tolist()}
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float16), allow_pickle=False)
        return {"format": "npy", **shape, "dtype": "float16", "data": base64.b64encode(buffer.getvalue()).decode()}
    span = high - low if high > low else 1.0
    levels = np.round((array - low) / span * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return {"format": "png", **shape, "bits": 16, "min": low, "max": high, "data": data}
