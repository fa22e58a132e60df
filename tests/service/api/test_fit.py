"""POST /v1/models/{model}/detectors/{name}/fit in-process with the small forms (JSON ``instances``, multipart
``files`` + ``labels``): each becomes a fit job that fits, calibrates and stores through the served preprocessing,
on the classifier and the segmenter; refusals (400 / 422, at once and before any job exists) for unknown or
unservable classes and inconsistent labels; the stratified hold-out fits 12 images where a random one failed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import torch

from service.settings import Settings
from tests.service.conftest import AUTH, AppRunner, digit_png, noise_png, png_bytes
from tests.service.jobs.archives import wait_job

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


def fitted(app: AppRunner, response: object) -> dict:
    """The finished job of a 202 answer."""
    assert response.status_code == 202, response.text  # type: ignore[attr-defined]
    job = wait_job(app, response.json()["id"])  # type: ignore[attr-defined]
    assert job["state"] == "done", job
    return job


def test_fit_route_fits_calibrates_and_stores(app: AppRunner) -> None:
    from ood_core.data import load_split

    images, labels = load_split("train")
    pick = torch.arange(0, 240)
    instances = [
        {"b64": base64.b64encode(digit_png(int(i), split="train")).decode(), "label": int(labels[i])} for i in pick
    ]
    body = {"detector_class": "Mahalanobis", "hparams": {"eps": 0.0}, "calibration_share": 0.25, "instances": instances}
    assert app.post("/v1/models/digits/detectors/fitted/fit", json=body).status_code == 401
    job = fitted(app, app.post("/v1/models/digits/detectors/fitted/fit", json=body, headers=AUTH))
    assert job["data"] == "images" and job["result"]["calibration_size"] == 60  # 25% of 240, per class
    info = app.get("/v1/models/digits/detectors").json()["detectors"]
    (state,) = [d for d in info if d["name"] == "fitted"]
    assert state["calibrated"] is True and state["detector_class"] == "Mahalanobis" and state["warnings"] == []
    digit, noise = score_of(app, "fitted", digit_png(0)), score_of(app, "fitted", noise_png(5))
    assert digit["score"] < noise["score"] and noise["is_ood"] is True
    bad = {**body, "detector_class": "NoSuchDetector"}
    unknown = app.post("/v1/models/digits/detectors/fitted2/fit", json=bad, headers=AUTH)
    assert unknown.status_code == 400 and "KNN" in unknown.json()["detail"]  # lists the classes it can fit
    odin = {**body, "detector_class": "ODIN"}
    assert app.post("/v1/models/digits/detectors/fitted2/fit", json=odin, headers=AUTH).status_code == 422
    assert app.get("/v1/jobs", params={"state": "queued"}).json()["jobs"] == []


def test_fit_route_multipart(app: AppRunner) -> None:
    files = [("files", (f"{i}.png", digit_png(i, split="train"))) for i in range(24)]
    from ood_core.data import load_split

    _, labels = load_split("train")
    data = {
        "detector_class": "KNN",
        "hparams": json.dumps({"k": 2}),
        "labels": ",".join(str(int(v)) for v in labels[:24]),
    }
    job = fitted(app, app.post("/v1/models/digits/detectors/knn-small/fit", files=files, data=data, headers=AUTH))
    assert job["parameters"]["hparams"] == {"k": 2} and job["images_done"] == 24
    wrong = {**data, "labels": "1,2"}
    answer = app.post("/v1/models/digits/detectors/knn-x/fit", files=files, data=wrong, headers=AUTH)
    assert answer.status_code == 400 and "2 labels for 24 images" in answer.json()["detail"]
    too_high = {**data, "labels": ",".join("6" * 24)}
    assert (
        app.post("/v1/models/digits/detectors/knn-x/fit", files=files, data=too_high, headers=AUTH).status_code == 400
    )
    assert "knn-x" not in app.get("/v1/models/digits").json()["detectors"]


def test_twelve_images_fit_with_a_stratified_hold_out(app: AppRunner) -> None:
    """Two images per class, share 0.1: one image is held out, and never a class's only one (the random hold-out
    of the old synchronous /fit took the only image of a class and failed)."""
    files = [("files", (f"{i}.png", digit_png(i, split="train"))) for i in range(40)]
    from ood_core.data import load_split

    _, labels = load_split("train")
    picked: list[int] = []
    for cls in range(6):
        picked += [i for i in range(40) if int(labels[i]) == cls][:2]
    form = {"detector_class": "Mahalanobis", "labels": ",".join(str(int(labels[i])) for i in picked)}
    job = fitted(
        app,
        app.post("/v1/models/digits/detectors/twelve/fit", files=[files[i] for i in picked], data=form, headers=AUTH),
    )
    assert job["result"]["calibration_size"] == 1 and any("too small" in w for w in job["result"]["warnings"])


def test_fit_route_calibrates_a_segmentation_detector(app: AppRunner) -> None:
    from ood_core.data import make_mosaics

    mosaics, _ = make_mosaics(10, ood_share=0.0, split="calibration")
    files = [
        ("files", (f"{i}.png", png_bytes((m[0].numpy() * 255).round().astype("uint8")))) for i, m in enumerate(mosaics)
    ]
    data = {"detector_class": "MaxLogit", "labels": ",".join("0" * 10), "calibration_share": "0.5"}
    fitted(app, app.post("/v1/models/digits-seg/detectors/maxlogit-cal/fit", files=files, data=data, headers=AUTH))
    info = app.get("/v1/models/digits-seg/detectors").json()["detectors"]
    assert [d["calibrated"] for d in info if d["name"] == "maxlogit-cal"] == [True]
    segmented = app.post("/v1/models/digits-seg/segment?detectors=maxlogit-cal&format=npy", files=files[:1]).json()
    verdict = segmented["results"][0]["detectors"]["maxlogit-cal"]
    assert verdict["threshold"] is not None and 0.0 <= verdict["ood_share"] < 0.5
    knn = {**data, "detector_class": "KNN"}
    refused = app.post("/v1/models/digits-seg/detectors/knn-seg/fit", files=files, data=knn, headers=AUTH)
    assert refused.status_code == 422 and "segmentation" in refused.json()["detail"]
