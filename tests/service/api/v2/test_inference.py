"""V2 inference equals ``/v1``: ``BYTES`` images in JSON and with the binary tensor extension, pixel tensors, an
absolute threshold, segmentation against ``/segment``. Over real HTTP with Triton's own client (``tritonclient.http``).
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from tests.service.api.v2.v2_bodies import IMAGES, bytes_input
from tests.service.conftest import digit_png, noise_png

pytestmark = pytest.mark.timeout(180)


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


def _levels(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("L"))


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
        [bytes_input(IMAGES, binary)],
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
    result = client.infer("digits", [bytes_input(IMAGES[:2], binary=True)])
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
    expected = client.infer("digits", [bytes_input(IMAGES, binary=True)], outputs=outputs)
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
    result = client.infer("digits", [bytes_input(IMAGES, False)], parameters={"threshold": 1.5, "detectors": "knn"})
    np.testing.assert_array_equal(result.as_numpy("threshold/knn"), [1.5] * len(IMAGES))
    np.testing.assert_array_equal(result.as_numpy("is_ood/knn"), result.as_numpy("score/knn") > 1.5)
    assert result.as_numpy("score/mahalanobis") is None  # not selected


def test_segmentation_infer_equals_v1_segment(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    images = [noise_png(4, 64), digit_png(5)]
    result = client.infer("digits-seg", [bytes_input(images, binary=True)], parameters={"detectors": "energy"})
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
