"""V2 health, server and model metadata, and who may read them: a key when reads need one (health stays open),
live but not ready while warming up. Over real HTTP with Triton's own client (``tritonclient.http``).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests.service.api.v2.v2_bodies import IMAGES, bytes_input
from tests.service.conftest import AUTH, NoLifespanClient, serve

pytestmark = pytest.mark.timeout(180)


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


def test_reads_need_a_key_when_configured_but_health_stays_open(make_settings: Callable[..., Settings]) -> None:
    with serve(make_settings(require_auth_for_read=True)) as url:
        with triton.InferenceServerClient(url=url.removeprefix("http://")) as v2:
            assert v2.is_server_live() and v2.is_server_ready()
            with pytest.raises(InferenceServerException) as error:
                v2.get_model_metadata("digits")
            assert error.value.status() == "401"
            with pytest.raises(InferenceServerException) as error:
                v2.infer("digits", [bytes_input(IMAGES[:1], binary=True)], headers={"Authorization": "Bearer wrong"})
            assert error.value.status() == "403"
            # a copy: tritonclient writes its Inference-Header-Content-Length (an int) into the dict it is given
            result = v2.infer("digits", [bytes_input(IMAGES[:1], binary=True)], headers=dict(AUTH))
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
