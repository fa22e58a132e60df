"""The hostile corpus of ``test_hostile.py`` and the checks of its answers, shared with ``test_hostile_memory.py``.

:data:`CASES`: every body (broken, huge, odd images and bodies, built here byte by byte) with the answer it must get:
a 200 with the documented handling (``service/engine/decode.py``) or a 4xx ``application/problem+json`` whose
``detail`` says why (:func:`check_problem`); :func:`check_maps_bounded`: a ``/segment`` answer's maps stay at the
model's input size.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.service.conftest import digit_png, encode, noise_png, png_bytes, png_chunk

SCORE = "/v1/models/digits/score"
SEGMENT = "/v1/models/digits-seg/segment"
SEG_INPUT = (64, 64)  # digits-seg's input size: the default size of its maps
MAX_IMAGES = 64  # the default max_images_per_request
PROBLEM = "application/problem+json"


# --- building the corpus ------------------------------------------------------------------------------------------


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid ~60-byte PNG whose IHDR announces ``width x height`` 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def digit_array(index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(digit_png(index))))


def digit_16bit_png() -> bytes:
    """The digit at 16 bits (v * 257): decoded as exactly the 8-bit digit."""
    return png_bytes(digit_array().astype(np.uint16) * 257)


def digit_palette_alpha_png() -> bytes:
    """The digit as a palette image (index = gray level) whose entry 0 is fully transparent WHITE: composited onto black
    it is the 8-bit digit again."""
    digit = digit_array()
    image = Image.new("P", (digit.shape[1], digit.shape[0]))
    image.putdata(digit.flatten().tolist())
    palette = [v for level in range(256) for v in (level, level, level)]
    palette[0:3] = [255, 255, 255]
    image.putpalette(palette)
    return encode(image, "PNG", transparency=0)


def digit_animated_gif() -> bytes:
    """First frame the digit, second frame noise: scored as the digit."""
    second = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8))
    return encode(Image.fromarray(digit_array()), "GIF", save_all=True, append_images=[second], duration=50, loop=0)


def cmyk_jpeg() -> bytes:
    cmyk = np.zeros((32, 32, 4), dtype=np.uint8)
    cmyk[8:24, 8:24] = (0, 0, 0, 0)  # white square
    cmyk[:8] = (0, 0, 0, 255)  # black band
    return encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=95)


def rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 48 wide x 24 high with EXIF orientation 6: served as 24 wide x 48 high."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.zeros((24, 48), dtype=np.uint8)
    stored[:8, :8] = 255
    return encode(Image.fromarray(stored), "JPEG", quality=90, exif=exif)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def noise_jpeg() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "JPEG")


def multipart(parts: list[tuple[str, bytes, str]], boundary: str = "hostile-boundary", close: bool = True) -> bytes:
    """``(filename, data, content type)`` parts named ``files``; ``close=False`` leaves out the close delimiter."""
    body = b""
    for filename, data, kind in parts:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                f"Content-Type: {kind}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body


@dataclass
class Case:
    name: str
    body: Callable[[], bytes]
    content_type: str = "multipart/form-data; boundary=hostile-boundary"
    status: int = 200
    detail: str = ""  # a 4xx: a substring of the problem's detail (case-insensitive)
    routes: tuple[str, ...] = (SCORE,)
    same_as_digit: bool = False  # a 200 on /score: scores identical to the 8-bit digit's (the documented handling)
    oriented_size: tuple[int, int] | None = None  # a 200 on /segment: answered (height, width)
    extra: dict[str, Any] = field(default_factory=dict)


def files(*parts: tuple[str, bytes, str]) -> Callable[[], bytes]:
    return lambda: multipart(list(parts))


def json_body(text: str) -> Callable[[], bytes]:
    return lambda: text.encode()


BOTH = (SCORE, SEGMENT)
JSON = "application/json"
CASES = [
    # undecodable or refused images: 4xx naming the image (its multipart filename)
    Case(
        "empty-file",
        files(("empty.png", b"", "image/png")),
        status=422,
        detail="empty.png: cannot decode image: empty file",
        routes=BOTH,
    ),
    Case(
        "truncated-png",
        files(("cut.png", truncated(noise_png(3, 64)), "image/png")),
        status=422,
        detail="cut.png: cannot decode",
        routes=BOTH,
    ),
    Case(
        "truncated-jpeg",
        files(("cut.jpg", truncated(noise_jpeg()), "image/jpeg")),
        status=422,
        detail="cut.jpg: cannot decode",
        routes=BOTH,
    ),
    Case(
        "decompression-bomb", files(("bomb.png", bomb_png(), "image/png")), status=413, detail="bomb.png", routes=BOTH
    ),
    Case(
        "text-as-image",
        files(("notes.png", b"hello, I am text\n" * 40, "image/png")),
        status=422,
        detail="notes.png: cannot decode",
        routes=BOTH,
    ),
    # decodable by the documented rules: 200
    Case("cmyk-jpeg", files(("cmyk.jpg", cmyk_jpeg(), "image/jpeg")), routes=BOTH, oriented_size=(32, 32)),
    Case(
        "palette-alpha-png",
        files(("p.png", digit_palette_alpha_png(), "image/png")),
        routes=BOTH,
        same_as_digit=True,
        oriented_size=(32, 32),
    ),
    Case(
        "animated-gif",
        files(("anim.gif", digit_animated_gif(), "image/gif")),
        routes=BOTH,
        same_as_digit=True,
        oriented_size=(32, 32),
    ),
    Case("exif-rotated-jpeg", files(("rot.jpg", rotated_jpeg(), "image/jpeg")), routes=BOTH, oriented_size=(48, 24)),
    Case(
        "16-bit-png",
        files(("wide.png", digit_16bit_png(), "image/png")),
        routes=BOTH,
        same_as_digit=True,
        oriented_size=(32, 32),
    ),
    # malformed bodies: 4xx saying what is wrong
    Case(
        "invalid-base64",
        json_body('{"instances": [{"b64": "not*base64!!"}]}'),
        JSON,
        422,
        "instances[0].b64 is not valid base64",
    ),
    Case(
        "b64-not-a-string", json_body('{"instances": [{"b64": 12345}]}'), JSON, 400, "instances[0] has no string 'b64'"
    ),
    Case("deeply-nested-json", json_body("[" * 100_000), JSON, 400, "JSON"),
    Case("json-not-an-object", json_body("[1, 2, 3]"), JSON, 400, "JSON body must be {'instances'"),
    Case("json-a-string", json_body('"instances"'), JSON, 400, "JSON body must be {'instances'"),
    Case("json-not-utf8", lambda: b'{"instances": "\xff\xfe"}', JSON, 400, "not valid JSON"),
    Case(
        "too-many-images",
        lambda: multipart([(f"d{i}.png", digit_png(0), "image/png") for i in range(MAX_IMAGES + 1)]),
        status=413,
        detail=f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}",
    ),
    Case(
        "multipart-unclosed",
        lambda: multipart([("d.png", digit_png(0), "image/png")], close=False),
        status=400,
        detail="no closing boundary",
    ),
    Case("multipart-no-boundary", files(("d.png", digit_png(0), "image/png")), "multipart/form-data", 400, "boundary"),
    Case("text-plain-body", json_body("hello"), "text/plain", 415, "text/plain"),
]


# --- checking the answers ----------------------------------------------------------------------------------------


def check_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith(PROBLEM), response.headers["content-type"]
    body = response.json()
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and detail.lower() in body["detail"].lower(), body["detail"]


def map_shape(encoded: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of an answered map, decoded."""
    if encoded["format"] == "json":
        rows = encoded["data"]
        return len(rows), len(rows[0]) if rows else 0
    data = base64.b64decode(encoded["data"])
    if encoded["format"] == "npy":
        shape = np.load(io.BytesIO(data), allow_pickle=False).shape
        return int(shape[0]), int(shape[1])
    image = Image.open(io.BytesIO(data))
    return image.height, image.width


def check_maps_bounded(response: httpx.Response, limit: tuple[int, int] = SEG_INPUT) -> None:
    """The answer is under 2 MB and each map at most the model input size (no ``?size=`` asked)."""
    assert response.status_code == 200, response.text[:500]
    assert len(response.content) < 2 * 1024 * 1024, f"segment answer of {len(response.content)} bytes"
    for result in response.json()["results"]:
        assert result["detectors"], "no detector answered a map"
        for name, verdict in result["detectors"].items():
            height, width = map_shape(verdict["map"])
            assert height <= limit[0] and width <= limit[1], f"{name}: map of {height}x{width} > {limit}"
