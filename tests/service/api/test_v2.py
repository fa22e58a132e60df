"""The Open Inference Protocol (V2) over real HTTP, driven by Triton's own client (``tritonclient.http``, written
by nobody here), against uvicorn on a free loopback port: health, server and model metadata, inference with
``BYTES`` images in JSON and with the binary tensor extension and with pixel tensors, all equal to what
``/v1/models/{model}/score`` (and ``/segment``) answer for the same images; and the protocol's 400 / 404 error
bodies for bad requests."""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests.service.conftest import AUTH, NoLifespanClient, digit_png, noise_png, serve

pytestmark = pytest.mark.timeout(180)
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(module_settings: Settings) -> Iterator[str]:
    with serve(module_settings.model_copy(update={"max_images_per_request": 8})) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=60.0) as v2:
        yield v2


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60.0) as session:
        yield session


IMAGES = [digit_png(0), digit_png(1), noise_png(3), digit_png(7)]
"""Three test digits and one noise image."""


def _v1_score(http: httpx.Client, images: list[bytes], **params: Any) -> list[dict[str, Any]]:
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    answer = http.post("/v1/models/digits/score", files=files, params=params)
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    return results


def _assert_equal_to_v1(result: triton.InferResult, v1: list[dict[str, Any]], detectors: list[str]) -> None:
    np.testing.assert_array_equal(result.as_numpy("prediction"), [r["prediction"]["index"] for r in v1])
    probability = result.as_numpy("probability")
    assert probability.dtype == np.float32
    np.testing.assert_array_equal(probability, np.array([r["prediction"]["probability"] for r in v1], dtype=np.float32))
    for name in detectors:
        verdicts = [r["detectors"][name] for r in v1]
        np.testing.assert_array_equal(
            result.as_numpy(f"score/{name}"), np.array([v["score"] for v in verdicts], dtype=np.float32)
        )
        np.testing.assert_array_equal(result.as_numpy(f"is_ood/{name}"), [v["is_ood"] for v in verdicts])
        np.testing.assert_array_equal(result.as_numpy(f"p_value/{name}"), [v["p_value"] for v in verdicts])
        np.testing.assert_array_equal(result.as_numpy(f"threshold/{name}"), [v["threshold"] for v in verdicts])
        output = result.get_output(f"score/{name}")
        assert output is not None and output["parameters"]["detector_version"] == verdicts[0]["version"]


def _bytes_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def _levels(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("L"))


def test_health_and_server_metadata(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits", "2")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "ood-serve" and metadata["extensions"] == ["binary_tensor_data"]
    assert metadata["version"] == http.get("/openapi.json").json()["info"]["version"]
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}


def test_model_metadata_lists_the_inputs_and_every_active_detectors_outputs(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    metadata = client.get_model_metadata("digits")
    assert metadata == client.get_model_metadata("digits", "1")
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [
        {"name": "images", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, -1, -1]},
    ]
    detectors = http.get("/v1/models/digits").json()["detectors"]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    expected = {"prediction": ("INT64", [-1]), "probability": ("FP32", [-1])}
    for name in detectors:  # every demo state is calibrated
        expected |= {f"score/{name}": ("FP32", [-1]), f"is_ood/{name}": ("BOOL", [-1])}
        expected |= {f"p_value/{name}": ("FP64", [-1]), f"threshold/{name}": ("FP64", [-1])}
    assert outputs == expected
    segmenter = {o["name"]: o["shape"] for o in client.get_model_metadata("digits-seg")["outputs"]}
    assert segmenter["score/energy"] == [-1, 64, 64] and segmenter["ood_share/energy"] == [-1]
    for model, version in (("nope", ""), ("digits", "2")):
        with pytest.raises(InferenceServerException) as error:
            client.get_model_metadata(model, version)
        assert error.value.status() == "404" and model in error.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_bytes_images_equals_v1_score(
    client: triton.InferenceServerClient, http: httpx.Client, binary: bool
) -> None:
    detectors = ["mahalanobis", "knn"]
    names = ["prediction", "probability"] + [f"{k}/{d}" for d in detectors for k in ("score", "is_ood", "p_value")]
    names += [f"threshold/{d}" for d in detectors]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = client.infer(
        "digits",
        [_bytes_input(IMAGES, binary)],
        outputs=outputs,
        request_id="req-7",
        parameters={"detectors": ",".join(detectors), "tpr": 0.9},
    )
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "digits" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == names  # the requested ones, in request order
    assert all(("data" in o) != binary for o in response["outputs"])
    _assert_equal_to_v1(result, _v1_score(http, IMAGES, detectors=",".join(detectors), tpr=0.9), detectors)


def test_infer_defaults_to_every_output_of_every_active_detector_as_binary(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    """tritonclient asks for no outputs: the server answers all of them, as binary (``binary_data_output``)."""
    result = client.infer("digits", [_bytes_input(IMAGES[:2], binary=True)])
    outputs = result.get_response()["outputs"]
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in outputs)
    detectors = http.get("/v1/models/digits").json()["detectors"]
    assert {o["name"] for o in outputs} == {"prediction", "probability"} | {
        f"{k}/{d}" for d in detectors for k in ("score", "is_ood", "p_value", "threshold")
    }
    _assert_equal_to_v1(result, _v1_score(http, IMAGES[:2]), detectors)


def test_pixel_tensors_score_like_the_png_files_of_them(client: triton.InferenceServerClient) -> None:
    levels = np.stack([_levels(image) for image in IMAGES])[:, None]  # N x 1 x 32 x 32 uint8
    names = ["prediction", "probability", "score/mahalanobis", "p_value/mahalanobis"]
    outputs = [triton.InferRequestedOutput(name, binary_data=True) for name in names]
    expected = client.infer("digits", [_bytes_input(IMAGES, binary=True)], outputs=outputs)
    uint8 = triton.InferInput("pixels", list(levels.shape), "UINT8")
    uint8.set_data_from_numpy(levels, binary_data=False)  # JSON integers
    fp32 = triton.InferInput("pixels", list(levels.shape), "FP32")
    fp32.set_data_from_numpy(levels.astype(np.float32) / 255.0, binary_data=True)
    rgb = triton.InferInput("pixels", [len(IMAGES), 3, 32, 32], "UINT8")  # gray as RGB: luma gives it back
    rgb.set_data_from_numpy(np.repeat(levels, 3, axis=1), binary_data=True)
    for tensor in (uint8, fp32, rgb):
        got = client.infer("digits", [tensor], outputs=outputs)
        for name in names:
            np.testing.assert_array_equal(got.as_numpy(name), expected.as_numpy(name), err_msg=name)


def test_an_absolute_threshold_applies_to_every_detector(client: triton.InferenceServerClient) -> None:
    result = client.infer("digits", [_bytes_input(IMAGES, False)], parameters={"threshold": 1.5, "detectors": "knn"})
    np.testing.assert_array_equal(result.as_numpy("threshold/knn"), [1.5] * len(IMAGES))
    np.testing.assert_array_equal(result.as_numpy("is_ood/knn"), result.as_numpy("score/knn") > 1.5)
    assert result.as_numpy("score/mahalanobis") is None  # not selected


def test_segmentation_infer_equals_v1_segment(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    images = [noise_png(4, 64), digit_png(5)]
    result = client.infer("digits-seg", [_bytes_input(images, binary=True)], parameters={"detectors": "energy"})
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    v1 = http.post("/v1/models/digits-seg/segment?format=json&detectors=energy", files=files).json()["results"]
    verdicts = [r["detectors"]["energy"] for r in v1]
    maps = result.as_numpy("score/energy")
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    np.testing.assert_array_equal(maps, np.array([v["map"]["data"] for v in verdicts], dtype=np.float32))
    np.testing.assert_array_equal(result.as_numpy("ood_share/energy"), [v["ood_share"] for v in verdicts])
    np.testing.assert_array_equal(
        result.as_numpy("max_score/energy"), np.array([v["max_score"] for v in verdicts], dtype=np.float32)
    )
    np.testing.assert_array_equal(result.as_numpy("threshold/energy"), [v["threshold"] for v in verdicts])


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
    not_an_image = _bytes_input([b"not an image"], binary=True)
    assert "images[0]" in _infer_error(client, not_an_image)
    good = _bytes_input(IMAGES[:1], binary=True)
    assert "tpr" in _infer_error(client, good, parameters={"tpr": 2.0})
    assert "no output 'logits'" in _infer_error(client, good, outputs=[triton.InferRequestedOutput("logits")])
    with pytest.raises(InferenceServerException) as error:
        client.infer("digits", [good], parameters={"detectors": "nope"})
    assert error.value.status() == "404" and "nope" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer("nope", [good])
    assert error.value.status() == "404"


def _post(http: httpx.Client, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post("/v2/models/digits/infer", content=content, headers=headers or {})


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


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

    tensor = _bytes_tensor(IMAGES[0])
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
        answer = _post(http, body, headers)
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


def test_reads_need_a_key_when_configured_but_health_stays_open(make_settings: Callable[..., Settings]) -> None:
    with serve(make_settings(require_auth_for_read=True)) as url:
        with triton.InferenceServerClient(url=url.removeprefix("http://")) as v2:
            assert v2.is_server_live() and v2.is_server_ready()
            with pytest.raises(InferenceServerException) as error:
                v2.get_model_metadata("digits")
            assert error.value.status() == "401"
            with pytest.raises(InferenceServerException) as error:
                v2.infer("digits", [_bytes_input(IMAGES[:1], binary=True)], headers={"Authorization": "Bearer wrong"})
            assert error.value.status() == "403"
            # a copy: tritonclient writes its Inference-Header-Content-Length (an int) into the dict it is given
            result = v2.infer("digits", [_bytes_input(IMAGES[:1], binary=True)], headers=dict(AUTH))
            assert result.as_numpy("prediction").shape == (1,)
        answer = httpx.get(f"{url}/v2/models/digits")
        assert answer.status_code == 401 and list(answer.json()) == ["error"]
        assert answer.headers["www-authenticate"].startswith("Bearer")


def test_a_warming_up_service_is_live_but_not_ready(make_settings: Callable[..., Settings]) -> None:
    from service.app import create_app

    client = NoLifespanClient(create_app(make_settings()))  # start-up never runs
    assert client.get("/v2/health/live").json() == {"live": True}
    for path in ("/v2/health/ready", "/v2/models/digits/ready", "/v2/models/digits"):
        answer = client.get(path)
        assert answer.status_code == 503 and "warming up" in answer.json()["error"], path
    answer = client.post("/v2/models/digits/infer", json={"inputs": []})
    assert answer.status_code == 503 and answer.headers["retry-after"]


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
        answer = _post(http, body, headers)
        assert answer.status_code == status, (str(body)[:200], answer.text[:300])
        assert status == 200 or list(answer.json()) == ["error"]
