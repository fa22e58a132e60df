"""Images as the client takes them -> encoded files for a multipart body, and anomaly maps back to arrays.

An image is a path (``str`` or ``os.PathLike``: the file is sent as it is), encoded bytes (any format Pillow reads),
a PIL image or a numpy array (both sent as PNG). Arrays: ``H x W`` or ``H x W x C`` (C = 1, 3, 4); ``uint8`` as
is, ``uint16`` as 16-bit grayscale (the service scales it, ``round(v / 257)``), ``bool`` as 0 / 255, floats read as
intensities in [0, 1] (``round(clip(v, 0, 1) * 255)``, NaN -> 0: the service's own rule for float images), other
integers when within 0-255. A 4-D array is a batch of ``N x H x W x C`` images.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image

from service.api.schemas import JsonMap, NpyMap, PngMap

ImageInput: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
Images: TypeAlias = ImageInput | Sequence[ImageInput]
EncodedImage: TypeAlias = tuple[str, bytes, str]
"""(file name, bytes, content type) of one multipart ``files`` part."""


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _array_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be H x W or H x W x C (C = 1, 3, 4), got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        if array.ndim != 2:
            raise ValueError("16-bit arrays must be grayscale (H x W)")
        return Image.fromarray(array)  # I;16
    elif np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"{array.dtype} image values must be within 0-255 (use uint16 for 16-bit images)")
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported image array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def encode_image(image: ImageInput, index: int = 0) -> EncodedImage:
    """One image as a multipart file part."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.name, path.read_bytes(), kind
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image-{index}", bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        if image.mode in ("F", "I"):  # 32-bit modes PNG cannot hold
            return encode_image(np.asarray(image), index)
        return f"image-{index}.png", _png(image), "image/png"
    if isinstance(image, np.ndarray):
        return f"image-{index}.png", _png(_array_image(image)), "image/png"
    raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")


def _as_list(images: Images) -> list[ImageInput]:
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    raise TypeError(f"images must be an image or a sequence of images, not {type(images).__name__}")


def encode_images(images: Images) -> list[EncodedImage]:
    """Every image of ``images`` (one image or a sequence) as a multipart file part, in order."""
    encoded = [encode_image(image, i) for i, image in enumerate(_as_list(images))]
    if not encoded:
        raise ValueError("no images given")
    return encoded


def decode_map(anomaly_map: PngMap | NpyMap | JsonMap) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A ``/segment`` anomaly map as a ``height x width`` float32 array (PNG: ``min + level / 65535 * (max - min)``;
    JSON nulls: NaN)."""
    if isinstance(anomaly_map, JsonMap):
        rows = [[np.nan if v is None else v for v in row] for row in anomaly_map.data]
        return np.asarray(rows, dtype=np.float32).reshape(anomaly_map.height, anomaly_map.width)
    raw = base64.b64decode(anomaly_map.data)
    if isinstance(anomaly_map, NpyMap):
        return np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)
    levels = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.float64)
    span = anomaly_map.max - anomaly_map.min
    return (anomaly_map.min + levels / 65535.0 * span).astype(np.float32)
