"""Encoded image bytes -> decoded Pillow images in ``L`` or ``RGB``, within the pixel limit.

The rules, in the order they apply (:func:`decode_image` = :func:`open_image` + :func:`load_image`):

1. **Pixel limit before decoding.** The size is read from the header (``Image.open`` is lazy) and an image
   announcing more than ``max_pixels`` pixels is refused with :class:`~service.errors.ImageTooLargeError` (413)
   before any pixel is decoded, which refuses decompression bombs (a 60-byte PNG whose IHDR announces
   100000 x 100000). A header announcing a zero width or height is a 422.
2. **Undecodable is 422.** Anything Pillow cannot identify or decode (not an image, an empty file, a truncated
   file, a corrupt stream, an exception from a format plugin) is :class:`~service.errors.ImageDecodeError` (422)
   whose detail starts with the image's source (multipart filename, ``files[i]`` or ``instances[i]``); never a 500
   (only a ``MemoryError`` is not caught). Truncated
   files are not half-decoded: the service never enables ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (a test checks
   it stays off once the whole service is imported).
3. **First frame.** Multi-frame files (animated GIF / APNG / WebP, multi-page TIFF, MPO) give their first frame.
4. **EXIF orientation first.** An EXIF ``Orientation`` of 2-8 is applied (``PIL.ImageOps.exif_transpose``) before
   any other step, so the image is what a viewer shows: a 4000 x 3000 JPEG with orientation 6 is served as
   3000 x 4000 (segmentation maps and the ``height``/``width`` answered are of the oriented image). Unreadable
   EXIF data counts as no orientation.
5. **Modes -> ``L`` (grayscale) or ``RGB``**, keeping the full range (no colour management: ICC profiles are
   ignored):

   * ``1`` (1-bit): 0 -> 0, 1 -> 255; ``L``, ``RGB``: unchanged.
   * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` and ``I`` (16-bit grayscale PNG / TIFF open as these): the 16-bit
     range is scaled, ``round(v / 257)``, so 0 -> 0, 25700 -> 100, 65535 -> 255 (Pillow's own ``convert`` would
     clip everything above 255 to white); ``I`` values outside 0..65535 are clipped to it first.
   * ``F`` (32-bit float, e.g. float TIFF): taken as intensities in [0, 1], the convention of float images in
     NumPy / PyTorch and of :meth:`~service.engine.preprocess.Preprocessor.pixels_from_tensor`:
     ``round(clip(v, 0, 1) * 255)``; NaN -> 0, +inf -> 255, -inf -> 0. No data-dependent rescaling (min-max
     would make one image's pixels depend on its other pixels).
   * ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX`` and palette (``P``) without transparency -> ``RGB`` (Pillow's
     conversion; CMYK is ``(255 - c) * (255 - k) / 255`` per channel, Adobe-inverted CMYK JPEGs are un-inverted
     by Pillow when read). 16-bit-per-channel colour and gray + alpha PNGs are reduced to 8 bits by Pillow when read
     (the high byte of each sample; gray + alpha opens as ``RGBA``), so their levels may differ by 1 from
     ``round(v / 257)``.
   * **Alpha is composited onto black** (0): ``LA`` -> ``L``, ``RGBA`` / ``PA`` -> ``RGB``, and ``P``, ``L``,
     ``RGB`` or 16-bit grayscale with a transparency entry (tRNS / GIF transparent index) likewise:
     ``out = colour * alpha / 255``, so a fully transparent pixel is black whatever colour it stores. Black is
     the demo digits' background and what most stored fully transparent pixels (0, 0, 0, 0) already hold.

   The model's mode is then taken by :meth:`~service.engine.preprocess.Preprocessor.pixels` with Pillow's
   ``convert``: ``RGB`` -> ``L`` is ITU-R 601-2 luma, ``L`` -> ``RGB`` repeats the channel. That method accepts
   any mode and applies step 5 itself (:func:`to_model_mode`), so an image that did not come through here is
   treated alike (EXIF orientation is a property of the file, applied only here).

No web framework here (import-linter contract): the errors are :mod:`service.errors`' and the API layer maps
them to statuses.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.errors import ImageDecodeError, ImageTooLargeError, ServiceError

BACKGROUND = 0
"""The value alpha is composited onto (black), in ``L`` and in every ``RGB`` channel."""

WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
"""Integer grayscale modes scaled from 0..65535 to 0..255."""
ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
_CHUNK_PIXELS = 1 << 20
"""Wide images are scaled in blocks of rows of about this many pixels (bounded temporary memory)."""

_ORIENTATION = ExifTags.Base.Orientation

# Pillow warns above MAX_IMAGE_PIXELS; the pixel limit here is checked from the header before any decoding, so the
# warning says nothing. Filtered once for the process (``warnings.catch_warnings`` per image costs ~5 us and is
# not thread-safe: images are decoded in several threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class RawImage:
    """Encoded image bytes and where they came from (for error messages)."""

    data: bytes
    source: str


def _decode_error(raw: RawImage, exc: Exception) -> ImageDecodeError:
    if not raw.data:
        reason = "empty file (0 bytes)"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image format Pillow can read"
    else:
        reason = str(exc) or type(exc).__name__
    return ImageDecodeError(f"{raw.source}: cannot decode image: {reason}")


def open_image(raw: RawImage, max_pixels: int) -> Image.Image:
    """Read only the header (``Image.open`` is lazy): 413 if it announces more than ``max_pixels``, 422 if it is
    not an image. Cheap enough for the event loop; :func:`load_image` then decodes the pixels."""
    try:
        image = Image.open(io.BytesIO(raw.data))
    except Image.DecompressionBombError as exc:  # Pillow's own, far larger limit (2 x MAX_IMAGE_PIXELS)
        raise ImageTooLargeError(f"{raw.source}: {exc}; the limit is {max_pixels} pixels") from exc
    except MemoryError:
        raise
    except Exception as exc:  # any plugin may raise anything on hostile input: all of it is "does not decode"
        raise _decode_error(raw, exc) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{raw.source}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{raw.source}: cannot decode image: its header announces {width}x{height} pixels")
    return image


def load_image(image: Image.Image, raw: RawImage) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image` (its first frame; 422 if they do not decode), apply
    its EXIF orientation and bring it to ``L`` or ``RGB`` (the module docstring's rules)."""
    try:
        image.load()
        return to_8bit(apply_orientation(image))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{raw.source}: {exc}") from exc
    except (MemoryError, ServiceError):
        raise
    except Exception as exc:  # as in open_image: a decoder's failure on hostile bytes is the image's fault
        raise _decode_error(raw, exc) from exc


def decode_image(raw: RawImage, max_pixels: int) -> Image.Image:
    """Decode one image; 413 if its header announces more than ``max_pixels``, 422 if it does not decode."""
    return load_image(open_image(raw, max_pixels), raw)


def orientation(image: Image.Image) -> int:
    """The EXIF ``Orientation`` (1-8) of a loaded image; 1 when absent, out of range or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # corrupt EXIF: shown as stored, like most viewers do
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def apply_orientation(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it (EXIF orientation applied); the same object when there is nothing to do."""
    if orientation(image) == 1:
        return image  # exif_transpose would copy the pixels even then
    return ImageOps.exif_transpose(image)


def to_8bit(image: Image.Image) -> Image.Image:
    """Any mode -> ``L`` or ``RGB`` (rule 5 of the module docstring); ``L``/``RGB`` without transparency come
    back as the same object."""
    mode = image.mode
    if mode in WIDE_GRAY_MODES:
        return _wide_to_l(image)
    if mode == "F":
        return _float_to_l(image)
    if mode == "1":
        image, mode = image.convert("L"), "L"
    if mode in ALPHA_MODES or "transparency" in image.info or _palette_has_alpha(image):
        return _composite(image)
    if mode in ("L", "RGB"):
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"image mode {mode!r} cannot be converted to RGB") from exc


def _palette_has_alpha(image: Image.Image) -> bool:
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def to_model_mode(image: Image.Image, mode: Literal["L", "RGB"]) -> Image.Image:
    """:func:`to_8bit`, then Pillow's ``L``/``RGB`` conversion to the model's ``mode`` (no copy if it already is)."""
    image = to_8bit(image)
    return image if image.mode == mode else image.convert(mode)


def _composite(image: Image.Image) -> Image.Image:
    """Alpha (or a transparency entry) composited onto :data:`BACKGROUND`: ``out = colour * alpha / 255``."""
    gray = image.mode in ("L", "LA", "La")
    with_alpha = "LA" if gray else "RGBA"
    if image.mode != with_alpha:
        image = image.convert(with_alpha)  # P / L / RGB + transparency, PA, premultiplied La / RGBa
    out = Image.new("L" if gray else "RGB", image.size, BACKGROUND)
    out.paste(image, mask=image)  # the mask is image's alpha band
    return out


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit ``I``) grayscale -> ``L``: clip to 0..65535, ``round(v / 257)`` (exact in integers:
    ``(v + 128) // 257``), in row blocks; a transparency value composites those pixels onto the background."""
    array = np.asarray(image)
    out = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, array.shape[1]))
    for start in range(0, array.shape[0], rows):
        block = np.clip(array[start : start + rows].astype(np.int64), 0, 65535)
        out[start : start + rows] = (block + 128) // 257
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        out[array == transparent] = BACKGROUND
    return Image.fromarray(out)


def _float_to_l(image: Image.Image) -> Image.Image:
    """``F`` -> ``L``: values in [0, 1] -> ``round(clip(v, 0, 1) * 255)``; NaN -> 0, +inf -> 255, -inf -> 0."""
    array = np.asarray(image)
    out = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, array.shape[1]))
    for start in range(0, array.shape[0], rows):
        block = np.nan_to_num(array[start : start + rows].astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        out[start : start + rows] = np.rint(np.clip(block, 0.0, 1.0) * 255.0)
    return Image.fromarray(out)
