"""V2 bad requests: bad tensors and malformed bodies answer the protocol's 400 with the reason, errors under
``/v2`` are protocol bodies while ``/v1`` keeps problem+json, hostile tensors are refused without work. Over real HTTP with Triton's own client (``tritonclient.http``).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.api.v2.v2_bodies import HEADER, IMAGES, bytes_input, bytes_tensor, post

pytestmark = pytest.mark.timeout(180)


def _infer_error(client: triton.InferenceServerClient, tensor: triton.InferInput, **kwargs: Any) -> str:
    with pytest.raises(InferenceServerException) as error:
        client.infer("digits", [tensor], **kwargs)
    assert error.value.status() == "400", error.value.message()
    return str(error.value.message())


def test_bad_tensors_answer_400_with_the_reason(client: triton.InferenceServerClient) -> None:
    wrong_type = triton.InferInput("images", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([7], dtype=np.int32))
    assert "must be BYTES" in _infer_error(client, wrong_type)
    wrong_shape = triton.InferInput("images", [1, 1], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[IMAGES[0]]], dtype=np.object_))
    assert "shape [N]" in _infer_error(client, wrong_shape)
    flat_pixels = triton.InferInput("pixels", [1024], "UINT8")
    flat_pixels.set_data_from_numpy(np.zeros(1024, dtype=np.uint8))
    assert "[N, C, H, W]" in _infer_error(client, flat_pixels)
    two_channels = triton.InferInput("pixels", [1, 2, 8, 8], "UINT8")
    two_channels.set_data_from_numpy(np.zeros((1, 2, 8, 8), dtype=np.uint8))
    assert "channels" in _infer_error(client, two_channels)
    levels_as_float = triton.InferInput("pixels", [1, 1, 8, 8], "FP32")
    levels_as_float.set_data_from_numpy(np.full((1, 1, 8, 8), 200.0, dtype=np.float32))
    assert "[0, 1]" in _infer_error(client, levels_as_float)
    unknown = triton.InferInput("input0", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([IMAGES[0]], dtype=np.object_))
    assert "unknown input 'input0'" in _infer_error(client, unknown)
    not_an_image = bytes_input([b"not an image"], binary=True)
    assert "images[0]" in _infer_error(client, not_an_image)
    good = bytes_input(IMAGES[:1], binary=True)
    assert "tpr" in _infer_error(client, good, parameters={"tpr": 2.0})
    assert "no output 'logits'" in _infer_error(client, good, outputs=[triton.InferRequestedOutput("logits")])
    with pytest.raises(InferenceServerException) as error:
        client.infer("digits", [good], parameters={"detectors": "nope"})
    assert error.value.status() == "404" and "nope" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer("nope", [good])
    assert error.value.status() == "404"


def test_malformed_bodies_answer_the_protocols_400(http: httpx.Client) -> None:
    b64 = base64.b64encode(IMAGES[0]).decode()
    image = {"name": "images", "shape": [2], "datatype": "BYTES", "data": [b64]}
    cases: list[tuple[bytes | dict[str, Any], dict[str, str], str]] = [
        (b"{not json", {}, "invalid inference request"),
        ({"inputs": []}, {}, "inputs"),
        ({"outputs": [{"name": "prediction"}]}, {}, "inputs"),
        ({"inputs": [image]}, {}, "2 elements"),
        ({"inputs": [{**image, "shape": [1], "data": ["%%%"]}]}, {}, "not valid base64"),
        ({"inputs": [{**image, "shape": [1], "data": [1]}]}, {}, "must be strings"),
        ({"inputs": [{**image, "shape": [1], "datatype": "FP99"}]}, {}, "datatype"),
        ({"inputs": [{**image, "shape": [1]}, {**image, "shape": [1]}]}, {}, "exactly one input"),
        ({"inputs": [{"name": "pixels", "shape": [1, 1, 1, 2], "datatype": "UINT8", "data": [0, 256]}]}, {}, "0..255"),
        ({"inputs": [{"name": "pixels", "shape": [1, 1, 1, 2], "datatype": "UINT8", "data": [[0], [1, 2]]}]}, {}, "3"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES"}]}, {}, "no data"),
    ]

    def binary(size: int, data: bytes, length: int | None = 0) -> tuple[bytes, dict[str, str], str]:
        parameters = {"binary_data_size": size}
        header = json.dumps({"inputs": [{**image, "shape": [1], "data": None, "parameters": parameters}]}).encode()
        return header + data, {} if length is None else {HEADER: str(length or len(header))}, ""

    tensor = bytes_tensor(IMAGES[0])
    for (binary_body, headers, _), reason in [
        (binary(len(tensor) + 1, tensor), "runs past the end"),
        (binary(len(tensor), b"", length=None), "header is missing"),
        (binary(len(tensor), tensor, length=None), f"needs the {HEADER} header"),
        (binary(len(tensor), tensor, length=10**9), HEADER),
        (binary(len(tensor), tensor + b"x"), "belong to no input"),
        (binary(8, struct.pack("<I", 10) + b"abcd"), "runs past its data"),
        (binary(3, b"abc"), "truncated BYTES element length"),
    ]:
        cases.append((binary_body, headers, reason))
    for body, headers, reason in cases:
        answer = post(http, body, headers)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.headers["content-type"] == "application/json"
        error = answer.json()
        assert list(error) == ["error"] and reason in error["error"], (reason, error)


def test_errors_under_v2_are_protocol_bodies_and_v1_keeps_problem_json(http: httpx.Client) -> None:
    for path in ("/v2/models/nope", "/v2/nothing", "/v2/models/digits/versions/9/ready"):
        answer = http.get(path)
        assert answer.status_code == 404 and list(answer.json()) == ["error"], path
    invalid_name = http.get("/v2/models/bad%20name")
    assert invalid_name.status_code == 400 and "model name" in invalid_name.json()["error"]  # /v1 says 422
    assert http.get("/v1/models/bad%20name").status_code == 422
    v1 = http.get("/v1/models/nope")
    assert v1.status_code == 404 and v1.headers["content-type"] == "application/problem+json"


def test_hostile_tensors_are_refused_without_work_or_a_server_error(http: httpx.Client) -> None:
    """Huge shapes are compared with the data before anything is allocated; deep nesting, NaN pixels and absurd
    sizes are client errors."""
    pixels = {"name": "pixels", "datatype": "UINT8"}
    nan = np.full((1, 1, 4, 4), np.nan, dtype=np.float32).tobytes()
    nan_header = json.dumps(
        {"inputs": [{**pixels, "datatype": "FP32", "shape": [1, 1, 4, 4], "parameters": {"binary_data_size": 64}}]}
    ).encode()
    cases: list[tuple[bytes | dict[str, Any], dict[str, str], int]] = [
        ({"inputs": [{**pixels, "shape": [1, 1, 2**40, 2**40], "data": [0]}]}, {}, 400),
        ({"inputs": [{**pixels, "shape": [1, 1, 0, 5], "data": []}]}, {}, 400),
        ({"inputs": [{**pixels, "shape": [1, 1, -1, 1], "data": [0]}]}, {}, 400),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2**63], "data": []}]}, {}, 413),
        ({"inputs": [{**pixels, "shape": [1, 1, 1, 1], "data": [[[[[[0]]]]]]}]}, {}, 200),  # nesting is allowed
        (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": ' + b"[" * 100_000, {}, 400),
        (nan_header + nan, {HEADER: str(len(nan_header))}, 400),
        (b"{}", {HEADER: "-1"}, 400),
        (b"\xff\xfe" * 100, {}, 400),
    ]
    for body, headers, status in cases:
        answer = post(http, body, headers)
        assert answer.status_code == status, (str(body)[:200], answer.text[:300])
        assert status == 200 or list(answer.json()) == ["error"]
