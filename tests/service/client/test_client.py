"""The synchronous client against the real service (uvicorn on a loopback port, the demo): listings, scoring
with every image form, segmentation maps, detector states, drift and typed errors."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ood_core.detector import EnergyBased
from ood_core.state import save_detector
from service.client import DetectorInfo, OODClient, ProblemError, ScoreResponse, decode_map
from tests.service.conftest import API_KEY, digit_png, noise_png

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(live_server: str) -> Iterator[OODClient]:
    with OODClient(live_server, api_key=API_KEY) as client:
        yield client


def test_models_and_detectors_are_listed_as_typed_results(client: OODClient) -> None:
    models = {m.name: m for m in client.models()}
    assert set(models) == {"digits", "digits-seg"}
    digits = client.model("digits")
    assert digits == models["digits"] and digits.task == "classification" and digits.input_size == [32, 32]
    detectors = {d.name: d for d in client.detectors("digits")}
    assert {"mahalanobis", "knn", "msp", "energy"} <= set(detectors)
    assert isinstance(detectors["mahalanobis"], DetectorInfo) and detectors["mahalanobis"].calibrated


def test_every_image_form_scores_like_the_raw_request(client: OODClient, live_server: str, tmp_path: Path) -> None:
    png = digit_png(3)
    path = tmp_path / "digit.png"
    path.write_bytes(png)
    image = Image.open(io.BytesIO(png))
    array = np.asarray(image)
    raw = httpx.post(f"{live_server}/v1/models/digits/score", files=[("files", ("d.png", png))], timeout=30)
    expected = ScoreResponse.model_validate(raw.json())
    for form in (png, path, str(path), image, array, array.astype(np.float64) / 255.0):
        answer = client.score("digits", form)
        assert answer.results[0].detectors == expected.results[0].detectors, type(form)
        assert answer.results[0].prediction == expected.results[0].prediction
    several = client.score("digits", [png, noise_png(1)], detectors=["mahalanobis", "msp"], threshold=0.5)
    assert [set(r.detectors) for r in several.results] == [{"mahalanobis", "msp"}] * 2
    assert all(v.threshold == 0.5 for r in several.results for v in r.detectors.values())
    noise = several.results[1].detectors["mahalanobis"]
    assert noise.score is not None and noise.score > several.results[0].detectors["mahalanobis"].score  # type: ignore[operator]


def test_segment_maps_decode_to_arrays_in_every_format(client: OODClient) -> None:
    tiles = np.kron(np.eye(2), np.ones((32, 32)))  # 64 x 64, float in [0, 1]
    npy = client.segment("digits-seg", tiles, detectors="energy", format="npy").results[0]
    png = client.segment("digits-seg", tiles, detectors="energy", format="png").results[0]
    assert (npy.height, npy.width) == (64, 64)
    as_npy, as_png = decode_map(npy.detectors["energy"].map), decode_map(png.detectors["energy"].map)
    assert as_npy.shape == as_png.shape == (64, 64)
    span = float(as_png.max() - as_png.min())
    assert np.allclose(as_npy, as_png, atol=span / 65535 + 0.01 * np.abs(as_png).max())  # 16-bit vs float16
    assert npy.detectors["energy"].max_score == pytest.approx(float(as_npy.max()), rel=1e-3)


def test_states_upload_download_versions_rollback_delete(client: OODClient, tmp_path: Path) -> None:
    first, second = save_detector(EnergyBased(t=1.0)), save_detector(EnergyBased(t=2.0))
    created = client.upload_state("digits", "client-energy", first)
    assert created.name == "client-energy" and created.version == 1 and created.detector_class == "EnergyBased"
    path = tmp_path / "second.safetensors"
    path.write_bytes(second)
    assert client.upload_state("digits", "client-energy", path).version == 2  # streamed from the file
    saved = tmp_path / "download.safetensors"
    assert client.download_state("digits", "client-energy", saved) == second == saved.read_bytes()
    versions = client.versions("digits", "client-energy")
    assert [v.version for v in versions.versions] == [2, 1] and versions.versions[0].active
    restored = client.rollback("digits", "client-energy", 1)
    assert restored.version == 3 and client.download_state("digits", "client-energy") == first
    client.delete_state("digits", "client-energy")
    with pytest.raises(ProblemError) as err:
        client.download_state("digits", "client-energy")
    assert err.value.status == 404 and "client-energy" in err.value.detail


def test_errors_carry_the_problem_body(client: OODClient, live_server: str) -> None:
    with pytest.raises(ProblemError) as err:
        client.score("nope", digit_png(0))
    problem = err.value.problem
    assert (problem.status, problem.instance) == (404, "/v1/models/nope/score") and problem.request_id
    assert err.value.attempts == 1 and str(err.value).startswith("404 ")
    with OODClient(live_server, api_key="") as anonymous, pytest.raises(ProblemError) as err:
        anonymous.upload_state("digits", "x", save_detector(EnergyBased()))
    assert err.value.status == 401 and err.value.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(ProblemError) as err:
        client.score("digits", b"not an image")
    assert err.value.status == 422 and err.value.detail.startswith("image-0")


def test_drift_counts_the_scored_images(client: OODClient) -> None:
    time.sleep(1.1)  # readings are recomputed at most every OOD_DRIFT_REFRESH_S (1 s) while images arrive
    before = client.drift("digits").detectors["mahalanobis"].filled
    client.score("digits", [digit_png(i) for i in range(5)])
    time.sleep(1.1)
    after = client.drift("digits")
    assert after.model == "digits" and after.detectors["mahalanobis"].filled == before + 5
    assert after.detectors["mahalanobis"].calibration_size is not None
