"""GET /v1/models/{model}/drift over real HTTP on the demo: in-distribution traffic (test digits 0-5) keeps every
detector's drift p-values above 0.05, a switch to digits 6-9 (never seen in training) drives them below 0.01
within one window, and the ``ood_drift_*`` gauges of ``/metrics`` say the same as ``/drift``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ood_core.data import load_split
from service.app import create_app
from service.settings import Settings
from tests.service.api.test_openapi import Conformance
from tests.service.conftest import AUTH, NoLifespanClient, png_bytes, serve

pytestmark = pytest.mark.timeout(300)
WINDOW = 250
BATCH = 25
CLASSIFIER_DETECTORS = {"mahalanobis", "knn", "msp", "energy"}
GAUGES = {
    "ood_drift_window_images": "filled",
    "ood_drift_ood_share": "ood_share",
    "ood_drift_expected_ood_share": "expected_share",
    "ood_drift_share_p_value": "share_p_value",
    "ood_drift_ks_statistic": "ks_statistic",
    "ood_drift_ks_p_value": "ks_p_value",
    "ood_drift_drifting": "drifting",
}


def _pngs(split: str, count: int) -> list[bytes]:
    images, _ = load_split(split)
    assert len(images) >= count
    return [png_bytes((images[i, 0].numpy() * 255).round().astype(np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def client(module_settings: Settings) -> Iterator[httpx.Client]:
    settings = module_settings.model_copy(update={"drift_window": WINDOW, "drift_refresh_s": 0.0})
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60.0) as http:
        yield http


def _score(client: httpx.Client, images: list[bytes]) -> None:
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    answer = client.post("/v1/models/digits/score", files=files)
    assert answer.status_code == 200, answer.text


def _drift(client: httpx.Client, model: str = "digits") -> dict[str, dict[str, object]]:
    answer = client.get(f"/v1/models/{model}/drift")
    assert answer.status_code == 200, answer.text
    detectors: dict[str, dict[str, object]] = answer.json()["detectors"]
    return detectors


def _gauges(client: httpx.Client) -> dict[tuple[str, str], dict[str, float]]:
    values: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name in GAUGES:
            for sample in family.samples:
                key = (sample.labels["model"], sample.labels["detector"])
                values.setdefault(key, {})[GAUGES[family.name]] = sample.value
    return values


def test_drift_is_declared_in_the_schema_and_starts_empty(client: httpx.Client) -> None:
    """The warm-up batch is not in the windows; segmentation detectors say why they are not tested."""
    conformance = Conformance(client.get("/openapi.json").json())
    answer = conformance.check(client.get("/v1/models/digits/drift"))
    assert answer.json()["alpha"] == 0.01
    detectors = answer.json()["detectors"]
    assert set(detectors) == CLASSIFIER_DETECTORS
    for reading in detectors.values():
        assert reading["filled"] == 0 and reading["window"] == WINDOW and reading["ks_p_value"] is None
        assert reading["calibration_size"] == 163 and reading["expected_share"] == pytest.approx(9 / 164)
    segmentation = conformance.check(client.get("/v1/models/digits-seg/drift")).json()["detectors"]
    assert segmentation and all(r["note"] and r["filled"] == 0 for r in segmentation.values())
    assert conformance.check(client.get("/v1/models/nope/drift")).status_code == 404


def test_id_traffic_keeps_drift_p_values_high_then_digits_6_to_9_drive_them_low_within_a_window(
    client: httpx.Client,
) -> None:
    in_distribution = _pngs("test", WINDOW)
    for start in range(0, WINDOW, BATCH * 2):
        _score(client, in_distribution[start : start + BATCH * 2])
    readings = _drift(client)
    for name, reading in readings.items():
        assert reading["filled"] == WINDOW, name
        assert reading["share_p_value"] > 0.05 and reading["ks_p_value"] > 0.05, (name, reading)  # type: ignore[operator]
        assert not reading["drifting"], name

    near_ood = _pngs("near_ood", WINDOW)
    detected: dict[str, int] = {}
    for sent in range(BATCH, WINDOW + 1, BATCH):
        _score(client, near_ood[sent - BATCH : sent])
        for name, reading in _drift(client).items():
            if name not in detected and reading["ks_p_value"] < 0.01 and reading["share_p_value"] < 0.01:  # type: ignore[operator]
                assert reading["drifting"], name
                detected[name] = sent
    assert set(detected) == CLASSIFIER_DETECTORS, f"not detected within {WINDOW} images: {detected}"

    gauges = _gauges(client)
    readings = _drift(client)
    for name, reading in readings.items():
        exported = gauges[("digits", name)]
        assert set(exported) == set(GAUGES.values()), name
        for field, value in exported.items():
            assert value == pytest.approx(float(reading[field]), rel=1e-12, abs=1e-300), (name, field)  # type: ignore[arg-type]
    assert not any(model == "digits-seg" for model, _ in gauges)


def test_drift_needs_a_key_when_reads_do(make_settings: Callable[..., Settings]) -> None:
    client = NoLifespanClient(create_app(make_settings(require_auth_for_read=True)))
    assert client.get("/v1/models/digits/drift").status_code == 401
    assert client.get("/v1/models/digits/drift", headers=AUTH).status_code == 503  # past auth; never started
