"""Encoded image bytes -> decoded Pillow images, within the pixel limit.

The pixel count is read from the header (``Image.open`` is lazy) and checked before any pixel is decoded, which
refuses decompression bombs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.errors import ImageDecodeError, ImageTooLargeError


@dataclass
class RawImage:
    """Encoded image bytes and where they came from (for error messages)."""

    data: bytes
    source: str


def open_image(raw: RawImage, max_pixels: int) -> Image.Image:
    """Read only the header (``Image.open`` is lazy): 413 if it announces more than ``max_pixels``, 422 if it is
    not an image. Cheap enough for the event loop; :func:`load_image` then decodes the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw.data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{raw.source}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{raw.source}: cannot decode image: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{raw.source}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    return image


def load_image(image: Image.Image, raw: RawImage) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image` (422 if they do not decode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{raw.source}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{raw.source}: cannot decode image: {exc}") from exc
    return image


def decode_image(raw: RawImage, max_pixels: int) -> Image.Image:
    """Decode one image; 413 if its header announces more than ``max_pixels``, 422 if it does not decode."""
    return load_image(open_image(raw, max_pixels), raw)
