"""Read the images of a request (multipart ``files`` or JSON ``instances``) and its other fields, within the
limits; decoding the images is the engine's (:mod:`service.engine.decode`)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from service.api.multipart import parse_multipart
from service.engine.decode import RawImage
from service.errors import BadRequestError, ImageDecodeError, TooManyImagesError, UnsupportedMediaTypeError

ACCEPTED_TYPES = ("multipart/form-data", "application/json")


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
        payload = orjson.loads(body)  # several times faster than json.loads; nesting is limited to 1024 levels
    except orjson.JSONDecodeError as exc:
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
