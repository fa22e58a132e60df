"""Detector states over the API: upload -> score -> download -> delete, validation before the swap, versions,
calibration (threshold, p-value), names, persistence across restarts, zero-downtime swaps, auth on every write
and, when required, on every read (in-process). The /fit route: test_fit.py."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ood_core.calibration import Calibration
from ood_core.detector import KNN, MCM, EnergyBased, Mahalanobis
from ood_core.state import save_detector
from service.settings import Settings
from tests.service.conftest import API_KEY, AUTH, AppRunner, digit_png, noise_png

pytestmark = pytest.mark.timeout(180)
STATE = {"Content-Type": "application/octet-stream"}
WRITE = {**AUTH, **STATE}


@pytest.fixture(scope="module")
def app(module_settings: Settings) -> Iterator[AppRunner]:
    runner = AppRunner(module_settings)
    yield runner
    runner.close()


def energy_state(t: float, calibrated: bool = False) -> bytes:
    detector = EnergyBased(t=t)
    calibration = Calibration.from_scores(torch.linspace(-10.0, 0.0, 101)) if calibrated else None
    return save_detector(detector, calibration=calibration)


def mahalanobis_state(dim: int, classes: int) -> bytes:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, dim, generator=generator)
    labels = torch.arange(60) % classes
    return save_detector(Mahalanobis().fit_features(features, labels))


def with_metadata(data: bytes, **changes: str) -> bytes:
    """The same state with some header metadata replaced (e.g. a class the library does not know)."""
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    return st_save(st_load(data), metadata={**metadata, **changes})


def score_of(app: AppRunner, name: str, png: bytes, query: str = "") -> dict:
    response = app.post(f"/v1/models/digits/score?detectors={name}{query}", files=[("files", ("x.png", png))])
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["detectors"][name]


def test_upload_score_download_delete(app: AppRunner) -> None:
    data = energy_state(2.0)
    created = app.put("/v1/models/digits/detectors/energy-t2", content=data, headers=WRITE)
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["version"] == 1 and info["detector_class"] == "EnergyBased" and info["calibrated"] is False
    assert info["sha256"] == __import__("hashlib").sha256(data).hexdigest()

    png = digit_png(2)
    t1, t2 = score_of(app, "energy", png), score_of(app, "energy-t2", png)
    assert t2["score"] != pytest.approx(t1["score"])  # the new state's temperature is used
    assert t2["threshold"] is None and t2["is_ood"] is None and t2["p_value"] is None  # no calibration
    forced = score_of(app, "energy-t2", png, f"&threshold={t2['score'] - 1}")
    assert forced["threshold"] == pytest.approx(t2["score"] - 1) and forced["is_ood"] is True

    download = app.get("/v1/models/digits/detectors/energy-t2")
    assert download.status_code == 200 and download.content == data
    assert download.headers["etag"] == f'"{info["sha256"]}"'

    listed = [d["name"] for d in app.get("/v1/models/digits/detectors").json()["detectors"]]
    assert "energy-t2" in listed
    assert app.delete("/v1/models/digits/detectors/energy-t2", headers=AUTH).status_code == 204
    assert app.get("/v1/models/digits/detectors/energy-t2").status_code == 404
    assert app.delete("/v1/models/digits/detectors/energy-t2", headers=AUTH).status_code == 404
    assert app.post("/v1/models/digits/score?detectors=energy-t2", files=[("files", ("x", png))]).status_code == 404
    assert "energy-t2" not in app.get("/v1/models/digits").json()["detectors"]


def test_replacing_bumps_the_version_and_keeps_the_previous_file(app: AppRunner) -> None:
    url = "/v1/models/digits/detectors/swap"
    assert app.put(url, content=energy_state(1.0), headers=WRITE).status_code == 201
    replaced = app.put(url, content=energy_state(3.0, calibrated=True), headers=WRITE)
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    folder = Path(app.context.settings.state_dir) / "digits" / "swap"
    assert sorted(p.name for p in folder.glob("v*.safetensors")) == ["v1.safetensors", "v2.safetensors"]
    assert score_of(app, "swap", digit_png(0))["version"] == 2


@pytest.mark.parametrize(
    ("make_state", "reason"),
    [
        (lambda: b"not a safetensors file", "truncated"),
        (lambda: mahalanobis_state(dim=16, classes=6), "dimension 16"),
        (lambda: mahalanobis_state(dim=64, classes=3), "3 classes"),
        (lambda: save_detector(MCM(None, torch.randn(6, 64))), "vision-language"),
        (lambda: energy_state(1.0)[:-3], "truncated"),
        (lambda: with_metadata(energy_state(1.0), **{"class": "Bogus"}), "unknown detector class 'Bogus'"),
    ],
)
def test_rejected_upload_leaves_the_active_state(app: AppRunner, make_state: Callable[[], bytes], reason: str) -> None:
    before = app.get("/v1/models/digits/detectors/mahalanobis")
    scored = score_of(app, "mahalanobis", digit_png(4))
    response = app.put("/v1/models/digits/detectors/mahalanobis", content=make_state(), headers=WRITE)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert reason in response.json()["detail"]
    assert app.get("/v1/models/digits/detectors/mahalanobis").content == before.content
    assert score_of(app, "mahalanobis", digit_png(4)) == scored


def test_threshold_and_p_value_come_from_the_states_calibration(app: AppRunner) -> None:
    png, url = digit_png(5), "/v1/models/digits/detectors/conformal"
    assert app.put(url, content=energy_state(1.0), headers=WRITE).status_code == 201
    s = score_of(app, "conformal", png)["score"]
    calibration = torch.linspace(s - 5.05, s + 4.95, 41, dtype=torch.float64)  # step 0.25, no score ties with s
    data = save_detector(EnergyBased(t=1.0), calibration=Calibration.from_scores(calibration))
    assert app.put(url, content=data, headers=WRITE).status_code == 200
    ordered = torch.sort(calibration).values
    default, half = score_of(app, "conformal", png), score_of(app, "conformal", png, "&tpr=0.5")
    for verdict in (default, half):
        assert verdict["score"] == pytest.approx(s, abs=1e-5)
        # conformal: (1 + #{calibration >= s}) / (n + 1), whatever the threshold
        assert verdict["p_value"] == pytest.approx((1 + int((calibration >= s).sum())) / 42)
    # threshold at TPR q: the smallest calibration score t with #{s_i <= t} / n >= q
    assert default["threshold"] == pytest.approx(float(ordered[math.ceil(0.95 * 41) - 1]))  # 95% by default
    assert half["threshold"] == pytest.approx(float(ordered[math.ceil(0.5 * 41) - 1]))
    assert default["is_ood"] is False and half["is_ood"] is True  # s lies between the two thresholds


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/digits/detectors/%2e%2e",
        "/v1/models/digits/detectors/..%2F..%2Fescape",
        "/v1/models/..%2F..%2Fescape/detectors/x",
        "/v1/models/digits/detectors/evil%0A",
        "/v1/models/digits/detectors/a%5C..%5Cb",
        "/v1/models/digits/detectors/%2Ftmp%2Fx",
    ],
)
def test_names_cannot_escape_the_state_dir(app: AppRunner, path: str) -> None:
    root = Path(app.context.settings.state_dir)
    before = sorted(root.parent.rglob("*"))
    response = app.put(path, content=energy_state(1.0), headers=WRITE)
    assert response.status_code in (404, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert sorted(root.parent.rglob("*")) == before


def test_segmentation_model_refuses_detectors_without_pixel_scores(app: AppRunner) -> None:
    knn = KNN(k=1).fit_features(torch.randn(10, 48), torch.arange(10) % 6)
    response = app.put("/v1/models/digits-seg/detectors/knn", content=save_detector(knn), headers=WRITE)
    assert response.status_code == 422 and "segmentation" in response.json()["detail"]


def test_upload_as_multipart_and_wrong_content_type(app: AppRunner) -> None:
    url = "/v1/models/digits/detectors/multi"
    response = app.put(url, files={"file": ("s.safetensors", energy_state(1.5))}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert app.put(url, content=b"{}", headers={**AUTH, "Content-Type": "application/json"}).status_code == 415
    raw = app.put(url, content=energy_state(2.5), headers=AUTH)  # no content type: the raw state file
    assert raw.status_code == 200 and raw.json()["version"] == 2


@pytest.mark.parametrize("name", [".hidden", "a..b", "x" * 65, "sp ace"])
def test_invalid_detector_names(app: AppRunner, name: str) -> None:
    response = app.put(f"/v1/models/digits/detectors/{name}", content=energy_state(1.0), headers=WRITE)
    assert response.status_code == 422, response.text
    assert "invalid detector name" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/models/digits/detectors/auth"),
        ("DELETE", "/v1/models/digits/detectors/mahalanobis"),
        ("POST", "/v1/models/digits/detectors/auth/fit"),
    ],
)
def test_every_write_needs_a_valid_key(app: AppRunner, method: str, path: str) -> None:
    missing = app.request(method, path, content=energy_state(1.0), headers=STATE)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = app.request(method, path, content=energy_state(1.0), headers={**STATE, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    basic = app.request(method, path, content=energy_state(1.0), headers={**STATE, "Authorization": f"Basic {API_KEY}"})
    assert basic.status_code == 401
    assert "mahalanobis" in app.get("/v1/models/digits").json()["detectors"]


def test_swap_under_load_fails_no_request(app: AppRunner) -> None:
    url = "/v1/models/digits/detectors/hot"
    assert app.put(url, content=energy_state(1.0), headers=WRITE).status_code == 201
    png = noise_png(3)

    async def traffic() -> list[int]:
        async def one() -> int:
            r = await app.client.post("/v1/models/digits/score?detectors=hot", files=[("files", ("n", png))])
            return r.status_code

        async def swaps() -> list[int]:
            codes = []
            for t in (2.0, 3.0, 4.0):
                r = await app.client.put(url, content=energy_state(t), headers=WRITE)
                codes.append(r.status_code)
            return codes

        scored, swapped = await asyncio.gather(asyncio.gather(*(one() for _ in range(60))), swaps())
        return [*scored, *swapped]

    codes = app.call(traffic())
    assert codes[:60] == [200] * 60
    assert codes[60:] == [200, 200, 200]
    assert {"energy", "hot"} <= {d["name"] for d in app.get("/v1/models/digits/detectors").json()["detectors"]}
    assert score_of(app, "hot", png)["version"] == 4


def test_states_survive_a_restart_and_read_auth(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    first = AppRunner(settings)
    try:
        assert (
            first.put("/v1/models/digits/detectors/kept", content=energy_state(5.0), headers=WRITE).status_code == 201
        )
        assert first.delete("/v1/models/digits/detectors/msp", headers=AUTH).status_code == 204
    finally:
        first.close()
    second = AppRunner(settings.model_copy(update={"require_auth_for_read": True}))
    try:
        detectors = second.get("/v1/models/digits", headers=AUTH).json()["detectors"]
        assert "kept" in detectors and "msp" not in detectors
        files = [("files", ("d", digit_png(0)))]
        reads = [
            ("GET", "/metrics", {}),
            ("GET", "/v1/models", {}),
            ("GET", "/v1/models/digits", {}),
            ("GET", "/v1/models/digits/detectors", {}),
            ("GET", "/v1/models/digits/detectors/kept", {}),
            ("POST", "/v1/models/digits/score", {"files": files}),
            ("POST", "/v1/models/digits-seg/segment", {"files": files}),
        ]
        for method, path, body in reads:
            assert second.request(method, path, **body).status_code == 401, path
            wrong = {"Authorization": "Bearer wrong"}
            assert second.request(method, path, headers=wrong, **body).status_code == 403, path
            assert second.request(method, path, headers=AUTH, **body).status_code == 200, path
        assert second.get("/healthz").status_code == 200 and second.get("/readyz").status_code == 200  # probes
        assert all(second.get(page).status_code == 404 for page in ("/openapi.json", "/docs"))  # no open schema
    finally:
        second.close()
    third = AppRunner(settings)  # the default: reads are open
    try:
        for method, path, body in reads:
            assert third.request(method, path, **body).status_code == 200, path
        assert third.get("/openapi.json").status_code == 200
    finally:
        third.close()
