"""Read routes in-process (httpx ASGITransport, lifespan running): models, scoring, segmentation, health, metrics."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Callable, Iterator
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from service.demo import DEFAULT_DETECTOR
from service.settings import Settings
from tests.service.conftest import AppRunner, digit_png, noise_png

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def app(module_settings: Settings) -> Iterator[AppRunner]:
    runner = AppRunner(module_settings)
    yield runner
    runner.close()


def test_health_and_readiness(app: AppRunner) -> None:
    assert app.get("/healthz").json() == {"status": "ok"}
    ready = app.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == ["digits", "digits-seg"]


MODEL_KEYS = {"name", "task", "classes", "input_size", "device", "detectors"}
STATE_KEYS = {"name", "version", "sha256", "size_bytes", "detector_class", "uploaded_at"}
VERDICT_KEYS = {"score", "threshold", "is_ood", "p_value"}


def test_models_list_and_one(app: AppRunner) -> None:
    listed = app.get("/v1/models").json()
    assert set(listed) == {"models"} and all(set(m) == MODEL_KEYS for m in listed["models"])
    models = {m["name"]: m for m in listed["models"]}
    assert models["digits"]["task"] == "classification"
    assert models["digits"]["classes"] == ["0", "1", "2", "3", "4", "5"]
    assert models["digits"]["input_size"] == [32, 32]
    assert set(models["digits"]["detectors"]) >= {"mahalanobis", "knn", "msp", "energy"}
    assert models["digits-seg"]["task"] == "segmentation"
    assert models["digits-seg"]["device"] in ("cpu", "cuda", "cuda:0")
    one = app.get("/v1/models/digits-seg")
    assert one.json() == models["digits-seg"]


def test_detector_list_gives_version_sha256_and_upload_time(app: AppRunner) -> None:
    listed = app.get("/v1/models/digits/detectors").json()
    assert listed["model"] == "digits"
    states = {d["name"]: d for d in listed["detectors"]}
    assert set(states) == set(app.get("/v1/models/digits").json()["detectors"])
    for name, state in states.items():
        assert set(state) >= STATE_KEYS
        assert state["version"] >= 1 and re.fullmatch(r"[0-9a-f]{64}", state["sha256"])
        assert datetime.strptime(state["uploaded_at"], "%Y-%m-%dT%H:%M:%SZ")
        download = app.get(f"/v1/models/digits/detectors/{name}")
        assert hashlib.sha256(download.content).hexdigest() == state["sha256"]
        assert len(download.content) == state["size_bytes"]


def test_unknown_model_is_404_problem_json(app: AppRunner) -> None:
    response = app.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 404 and "nope" in body["detail"] and body["instance"] == "/v1/models/nope"


def test_id_digit_scores_lower_than_noise_and_predicts_its_class(app: AppRunner) -> None:
    from ood_core.data import load_split

    _, labels = load_split("test")
    files = [("files", ("digit.png", digit_png(0), "image/png")), ("files", ("noise.png", noise_png(1), "image/png"))]
    response = app.post("/v1/models/digits/score", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "results"} and body["model"] == "digits"
    digit, noise = body["results"]
    for result in body["results"]:
        assert set(result) == {"prediction", "detectors"}
        assert set(result["prediction"]) == {"index", "label", "probability"}
        assert set(result["detectors"]) == {"mahalanobis", "knn", "msp", "energy"}  # default: every active one
        for verdict in result["detectors"].values():
            assert set(verdict) >= VERDICT_KEYS
            assert verdict["is_ood"] == (verdict["score"] > verdict["threshold"])
            assert 0.0 < verdict["p_value"] <= 1.0
    name = DEFAULT_DETECTOR["digits"]
    assert digit["detectors"][name]["score"] < noise["detectors"][name]["score"]
    assert digit["detectors"][name]["is_ood"] is False and noise["detectors"][name]["is_ood"] is True
    assert noise["detectors"][name]["p_value"] < digit["detectors"][name]["p_value"]
    assert digit["prediction"]["index"] == int(labels[0])
    assert digit["prediction"]["label"] == str(int(labels[0]))
    assert 0.0 < digit["prediction"]["probability"] <= 1.0


def test_json_instances_give_the_same_scores_as_multipart(app: AppRunner) -> None:
    png = digit_png(3)
    multipart = app.post("/v1/models/digits/score", files=[("files", ("d.png", png))]).json()
    instances = {"instances": [{"b64": base64.b64encode(png).decode()}]}
    as_json = app.post("/v1/models/digits/score", json=instances).json()
    assert as_json["results"][0]["detectors"].keys() == multipart["results"][0]["detectors"].keys()
    for name, verdict in as_json["results"][0]["detectors"].items():
        assert verdict["score"] == pytest.approx(multipart["results"][0]["detectors"][name]["score"], rel=1e-5)


def test_results_keep_request_order(app: AppRunner) -> None:
    pngs = [digit_png(i) for i in range(5)]
    both = app.post("/v1/models/digits/score?detectors=knn", files=[("files", (f"{i}", p)) for i, p in enumerate(pngs)])
    single = [app.post("/v1/models/digits/score?detectors=knn", files=[("files", ("x", p))]) for p in pngs]
    got = [r["detectors"]["knn"]["score"] for r in both.json()["results"]]
    want = [s.json()["results"][0]["detectors"]["knn"]["score"] for s in single]
    assert got == pytest.approx(want, rel=1e-4)


def test_detector_selection_and_threshold_overrides(app: AppRunner) -> None:
    files = [("files", ("d.png", digit_png(1)))]
    only = app.post("/v1/models/digits/score?detectors=msp,energy", files=files).json()["results"][0]["detectors"]
    assert set(only) == {"msp", "energy"}
    listed = {d["name"]: d for d in app.get("/v1/models/digits/detectors").json()["detectors"]}
    assert only["msp"]["threshold"] == pytest.approx(listed["msp"]["default_threshold"])
    score = only["msp"]["score"]
    below = app.post(f"/v1/models/digits/score?detectors=msp&threshold={score - 1e-3}", files=files).json()
    above = app.post(f"/v1/models/digits/score?detectors=msp&threshold={score + 1e-3}", files=files).json()
    assert below["results"][0]["detectors"]["msp"]["is_ood"] is True
    assert above["results"][0]["detectors"]["msp"]["is_ood"] is False
    assert below["results"][0]["detectors"]["msp"]["threshold"] == pytest.approx(score - 1e-3)
    low_tpr = app.post("/v1/models/digits/score?detectors=mahalanobis&tpr=0.5", files=files).json()
    high_tpr = app.post("/v1/models/digits/score?detectors=mahalanobis&tpr=0.99", files=files).json()
    assert (
        low_tpr["results"][0]["detectors"]["mahalanobis"]["threshold"]
        < high_tpr["results"][0]["detectors"]["mahalanobis"]["threshold"]
    )


@pytest.mark.parametrize(
    ("query", "status"),
    [("detectors=nope", 404), ("threshold=inf", 400), ("tpr=1.5", 422), ("detectors=..%2Fx", 404)],
)
def test_bad_score_parameters(app: AppRunner, query: str, status: int) -> None:
    response = app.post(f"/v1/models/digits/score?{query}", files=[("files", ("d.png", digit_png(0)))])
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"]


def test_segment_maps_at_the_image_resolution_on_request_in_every_format(app: AppRunner) -> None:
    image = np.zeros((48, 40), dtype=np.uint8)
    image[8:40, 4:36] = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    files = [("files", ("m.png", buffer.getvalue()))]
    maps = {}
    for fmt in ("json", "npy", "png"):
        response = app.post(f"/v1/models/digits-seg/segment?format={fmt}&detectors=energy&size=original", files=files)
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert (result["height"], result["width"]) == (48, 40)
        energy = result["detectors"]["energy"]
        encoded = energy["map"]
        assert (encoded["height"], encoded["width"]) == (48, 40)
        if fmt == "json":
            maps[fmt] = np.asarray(encoded["data"], dtype=np.float32)
        elif fmt == "npy":
            array = np.load(io.BytesIO(base64.b64decode(encoded["data"])), allow_pickle=False)
            assert array.dtype == np.float16
            maps[fmt] = array.astype(np.float32)
        else:
            data = base64.b64decode(encoded["data"])
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and (data[24], data[25]) == (16, 0)  # IHDR: 16-bit gray
            png = Image.open(io.BytesIO(data))
            levels = np.asarray(png).astype(np.float64)
            assert levels.max() > 255  # 16-bit levels
            maps[fmt] = (encoded["min"] + levels / 65535.0 * (encoded["max"] - encoded["min"])).astype(np.float32)
        assert maps[fmt].shape == (48, 40)
        assert energy["max_score"] == pytest.approx(float(maps["json"].max()), rel=1e-4, abs=1e-4)
        share = float((maps["json"] > energy["threshold"]).mean())
        assert energy["ood_share"] == pytest.approx(share)
    span = float(maps["json"].max() - maps["json"].min())
    assert np.abs(maps["npy"] - maps["json"]).max() < 0.01 * max(span, 1.0)
    assert np.abs(maps["png"] - maps["json"]).max() < 1e-3 * max(span, 1.0)


def test_segment_maps_are_bounded_by_default_and_sized_on_request(app: AppRunner) -> None:
    """Default: the model's input size (64x64), whatever the image's size; ``?size=HxW`` within the limits."""
    wide = [("files", ("wide.png", noise_png(6, size=300)))]
    url = "/v1/models/digits-seg/segment?format=npy&detectors=energy"
    default = app.post(url, files=wide).json()["results"][0]
    assert (default["height"], default["width"]) == (300, 300)
    encoded = default["detectors"]["energy"]["map"]
    array = np.load(io.BytesIO(base64.b64decode(encoded["data"])), allow_pickle=False)
    assert array.shape == (encoded["height"], encoded["width"]) == (64, 64)
    sized = app.post(url + "&size=32x96", files=wide).json()["results"][0]["detectors"]["energy"]["map"]
    assert (sized["height"], sized["width"]) == (32, 96)
    too_many = app.post(url + "&size=4096x4096", files=wide)
    assert too_many.status_code == 413 and "smaller ?size=" in too_many.json()["detail"]
    assert app.post(url + "&size=0x5", files=wide).status_code == 422


def test_segment_answer_over_the_response_budget_is_refused_before_any_work(
    make_settings: Callable[..., Settings],
) -> None:
    runner = AppRunner(make_settings(max_response_mb=0.05))
    try:
        files = [("files", (f"{i}.png", noise_png(i, size=64))) for i in range(3)]
        url = "/v1/models/digits-seg/segment?size=original"
        json_maps = runner.post(url + "&format=json", files=files)  # 3 x 3 detectors x 4096 px x 24 B ~ 0.84 MiB
        assert json_maps.status_code == 413 and "response limit" in json_maps.json()["detail"]
        assert runner.post(url + "&format=png&detectors=energy", files=files).status_code == 200  # ~32 KiB
    finally:
        runner.close()


def test_segment_threshold_and_tpr_overrides(app: AppRunner) -> None:
    files = [("files", ("m.png", noise_png(4, size=64)))]

    def energy(query: str) -> dict:
        response = app.post(f"/v1/models/digits-seg/segment?format=json&detectors=energy&{query}", files=files)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["detectors"]["energy"]

    scores = np.asarray(energy("")["map"]["data"], dtype=np.float64)
    middle = float(np.median(scores))
    at_median = energy(f"threshold={middle}")
    assert at_median["threshold"] == pytest.approx(middle)
    assert at_median["ood_share"] == pytest.approx(float((scores > middle).mean()), abs=1e-3)
    assert energy(f"threshold={scores.max() + 1}")["ood_share"] == 0.0
    assert energy(f"threshold={scores.min() - 1}")["ood_share"] == 1.0
    assert energy("tpr=0.5")["threshold"] < energy("tpr=0.99")["threshold"]


def test_routes_refuse_the_other_task(app: AppRunner) -> None:
    """A route of the other task does not exist for that model: 404, saying which route to use."""
    files = [("files", ("d.png", digit_png(0)))]
    wrong_task = app.post("/v1/models/digits/segment", files=files)
    assert wrong_task.status_code == 404 and "use /score" in wrong_task.json()["detail"]
    assert app.post("/v1/models/digits-seg/score", files=files).status_code == 404


def test_request_id_is_echoed_or_generated(app: AppRunner) -> None:
    assert app.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = app.get("/v1/models/nope")
    assert len(generated.headers["x-request-id"]) == 32
    assert generated.json()["request_id"] == generated.headers["x-request-id"]


def test_metrics_expose_requests_batches_scores_and_states(app: AppRunner) -> None:
    app.post("/v1/models/digits/score", files=[("files", ("d.png", digit_png(0)))])
    text = app.get("/metrics").text
    assert 'ood_http_requests_total{method="POST",route="/v1/models/{model}/score",status="200"}' in text
    assert "ood_http_request_duration_seconds_bucket" in text
    assert 'ood_batch_size_count{model="digits"}' in text
    assert 'ood_queue_wait_seconds_count{model="digits"}' in text
    assert 'ood_batch_compute_seconds_count{model="digits"}' in text
    assert 'ood_queue_depth{model="digits"} 0.0' in text
    assert 'ood_images_scored_total{model="digits",route="score"}' in text
    assert 'ood_verdicts_total{detector="mahalanobis",model="digits",verdict="id"}' in text
    assert 'ood_score_bucket{detector="knn"' in text and 'ood_p_value_bucket{detector="knn"' in text
    assert 'ood_detector_state_info{detector="mahalanobis",detector_class="Mahalanobis",model="digits"' in text
