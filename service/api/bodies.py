"""Read images from a request (multipart ``files`` or JSON ``instances``) and decode them within the limits.

The pixel count is read from the header (``Image.open`` is lazy) and checked before any pixel is decoded, which
refuses decompression bombs.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from service.errors import (
    BadRequestError,
    ImageDecodeError,
    ImageTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from service.multipart import parse_multipart

ACCEPTED_TYPES = ("multipart/form-data", "application/json")


@dataclass
class RawImage:
    """Encoded image bytes and where they came from (for error messages)."""

    data: bytes
    source: str


@dataclass
class ParsedBody:
    images: list[RawImage]
    fields: dict[str, Any]
    """Other form fields / JSON keys (e.g. ``labels`` for /fit)."""
    instances: list[dict[str, Any]]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_images: int) -> ParsedBody:
    """Images and other fields from a multipart or JSON body; 415 for any other content type."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        images: list[RawImage] = []
        fields: dict[str, Any] = {}
        for part in parse_multipart(await request.body(), request.headers.get("content-type", "")):
            if part.is_file:
                if part.name == "files":
                    images.append(RawImage(part.data, part.filename or f"files[{len(images)}]"))
            else:
                fields.setdefault(part.name, []).append(part.data.decode("utf-8", "replace"))
        parsed = ParsedBody(images, fields, [])
    elif kind == "application/json":
        parsed = _json_body(await request.body())
    else:
        raise UnsupportedMediaTypeError(
            f"content type {kind or '(none)'!r} is not accepted; send multipart/form-data with 'files' or "
            "application/json with {'instances': [{'b64': ...}]}"
        )
    if not parsed.images:
        raise BadRequestError("no images: send one or more 'files' parts or JSON 'instances'")
    if len(parsed.images) > max_images:
        raise TooManyImagesError(f"{len(parsed.images)} images in one request; the limit is {max_images}")
    return parsed


def _json_body(body: bytes) -> ParsedBody:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"body is not valid JSON: {exc}") from exc
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise BadRequestError("JSON body must be {'instances': [{'b64': '<base64 image>'}, ...]}")
    images = []
    for index, instance in enumerate(instances):
        encoded = instance.get("b64")
        if not isinstance(encoded, str):
            raise BadRequestError(f"instances[{index}] has no string 'b64'")
        try:
            images.append(RawImage(base64.b64decode(encoded, validate=True), f"instances[{index}]"))
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"instances[{index}].b64 is not valid base64: {exc}") from exc
    fields = {k: v for k, v in payload.items() if k != "instances"}
    return ParsedBody(images, fields, instances)


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


IMAGES_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "instances": {
                            "type": "array",
                            "items": {"type": "object", "properties": {"b64": {"type": "string", "format": "byte"}}},
                        }
                    },
                    "required": ["instances"],
                }
            },
        },
    }
}
"""OpenAPI description of the image bodies (the routes parse the body themselves, to control limits/errors)."""
