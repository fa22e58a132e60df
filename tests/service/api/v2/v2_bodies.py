"""What the V2 tests send: the images, the binary-extension header and ``BYTES`` tensors / bodies built of them."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import numpy as np
import tritonclient.http as triton

from tests.service.conftest import digit_png, noise_png

HEADER = "Inference-Header-Content-Length"
IMAGES = [digit_png(0), digit_png(1), noise_png(3), digit_png(7)]
"""Three test digits and one noise image."""


def bytes_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def post(http: httpx.Client, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post("/v2/models/digits/infer", content=content, headers=headers or {})


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
