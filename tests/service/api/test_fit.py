"""POST /v1/models/{model}/detectors/{name}/fit in-process: fit + calibrate + store through the served
preprocessing, as JSON or multipart, on the classifier and the segmenter; refusals for unknown or unservable
classes and inconsistent labels."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import torch

from service.settings import Settings
from tests.service.conftest import AUTH, AppRunner, digit_png, noise_png, png_bytes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def app(module_settings: Settings) -> Iterator[AppRunner]:
    runner = AppRunner(module_settings)
    yield runner
    runner.close()


def score_of(app: AppRunner, name: str, png: bytes) -> dict:
    response = app.post(f"/v1/models/digits/score?detectors={name}", files=[("files", ("x.png", png))])
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["detectors"][name]


def test_fit_route_fits_calibrates_and_stores(app: AppRunner) -> None:
    from ood_core.data import load_split

    images, labels = load_split("train")
    pick = torch.arange(0, 240)
    instances = [
        {"b64": base64.b64encode(digit_png(int(i), split="train")).decode(), "label": int(labels[i])} for i in pick
    ]
    body = {"detector_class": "Mahalanobis", "hparams": {"eps": 0.0}, "calibration_share": 0.25, "instances": instances}
    assert app.post("/v1/models/digits/detectors/fitted/fit", json=body).status_code == 401
    response = app.post("/v1/models/digits/detectors/fitted/fit", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["calibrated"] is True and response.json()["detector_class"] == "Mahalanobis"
    digit, noise = score_of(app, "fitted", digit_png(0)), score_of(app, "fitted", noise_png(5))
    assert digit["score"] < noise["score"] and noise["is_ood"] is True
    bad = {**body, "detector_class": "NoSuchDetector"}
    assert app.post("/v1/models/digits/detectors/fitted2/fit", json=bad, headers=AUTH).status_code == 400
    odin = {**body, "detector_class": "ODIN"}
    assert app.post("/v1/models/digits/detectors/fitted2/fit", json=odin, headers=AUTH).status_code == 422


def test_fit_route_multipart(app: AppRunner) -> None:
    files = [("files", (f"{i}.png", digit_png(i, split="train"))) for i in range(24)]
    from ood_core.data import load_split

    _, labels = load_split("train")
    data = {
        "detector_class": "KNN",
        "hparams": json.dumps({"k": 2}),
        "labels": ",".join(str(int(v)) for v in labels[:24]),
    }
    response = app.post("/v1/models/digits/detectors/knn-small/fit", files=files, data=data, headers=AUTH)
    assert response.status_code == 201, response.text
    wrong = {**data, "labels": "1,2"}
    assert app.post("/v1/models/digits/detectors/knn-x/fit", files=files, data=wrong, headers=AUTH).status_code == 400


def test_fit_route_calibrates_a_segmentation_detector(app: AppRunner) -> None:
    from ood_core.data import make_mosaics

    mosaics, _ = make_mosaics(10, ood_share=0.0, split="calibration")
    files = [
        ("files", (f"{i}.png", png_bytes((m[0].numpy() * 255).round().astype("uint8")))) for i, m in enumerate(mosaics)
    ]
    data = {"detector_class": "MaxLogit", "labels": ",".join("0" * 10), "calibration_share": "0.5"}
    response = app.post("/v1/models/digits-seg/detectors/maxlogit-cal/fit", files=files, data=data, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["calibrated"] is True
    segmented = app.post("/v1/models/digits-seg/segment?detectors=maxlogit-cal&format=npy", files=files[:1]).json()
    verdict = segmented["results"][0]["detectors"]["maxlogit-cal"]
    assert verdict["threshold"] is not None and 0.0 <= verdict["ood_share"] < 0.5
    knn = {**data, "detector_class": "KNN"}
    refused = app.post("/v1/models/digits-seg/detectors/knn-seg/fit", files=files, data=knn, headers=AUTH)
    assert refused.status_code == 422 and "segmentation" in refused.json()["detail"]
