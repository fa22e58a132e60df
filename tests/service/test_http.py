"""The demo over real HTTP: uvicorn on a free 127.0.0.1 port, every route family, 200 concurrent clients."""

from __future__ import annotations

import asyncio
import base64
import re

import httpx
import pytest

from ood_core.detector import EnergyBased
from ood_core.state import save_detector
from service.demo import DEFAULT_DETECTOR
from tests.service.conftest import AUTH, digit_png, noise_png

pytestmark = pytest.mark.timeout(180)


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, flags=re.M)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


def test_demo_end_to_end(live_server: str) -> None:
    assert httpx.get(f"{live_server}/healthz").status_code == 200
    assert httpx.get(f"{live_server}/readyz").json()["status"] == "ready"
    names = [m["name"] for m in httpx.get(f"{live_server}/v1/models").json()["models"]]
    assert names == ["digits", "digits-seg"]
    files = [("files", ("digit.png", digit_png(7))), ("files", ("noise.png", noise_png(9)))]
    results = httpx.post(f"{live_server}/v1/models/digits/score", files=files).json()["results"]
    name = DEFAULT_DETECTOR["digits"]
    assert results[0]["detectors"][name]["score"] < results[1]["detectors"][name]["score"]
    seg = httpx.post(f"{live_server}/v1/models/digits-seg/segment?format=npy", files=files[:1])
    assert seg.status_code == 200 and seg.json()["results"][0]["detectors"]["energy"]["map"]["format"] == "npy"


def test_state_lifecycle_over_http(live_server: str) -> None:
    url = f"{live_server}/v1/models/digits/detectors/http-energy"
    data = save_detector(EnergyBased(t=0.5))
    headers = {"Content-Type": "application/octet-stream"}
    assert httpx.put(url, content=data, headers=headers).status_code == 401
    assert httpx.put(url, content=data, headers={**headers, **AUTH}).status_code == 201
    png = base64.b64encode(digit_png(1)).decode()
    scored = httpx.post(
        f"{live_server}/v1/models/digits/score?detectors=http-energy", json={"instances": [{"b64": png}]}
    )
    assert set(scored.json()["results"][0]["detectors"]) == {"http-energy"}
    assert httpx.get(url).content == data
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers=AUTH).status_code == 204
    assert httpx.get(url).status_code == 404


def test_200_concurrent_requests_are_batched(live_server: str) -> None:
    before = httpx.get(f"{live_server}/metrics").text
    count_before = metric(before, "ood_batch_size_count", 'model="digits"')
    png = digit_png(0)

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=live_server, limits=limits, timeout=60) as client:
            requests = [
                client.post("/v1/models/digits/score?detectors=mahalanobis", files=[("files", ("d.png", png))])
                for _ in range(200)
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 200
    scores = {r.json()["results"][0]["detectors"]["mahalanobis"]["score"] for r in responses}
    assert max(scores) - min(scores) < 1e-3 * max(1.0, abs(max(scores)))  # same image, same score in any batch
    after = httpx.get(f"{live_server}/metrics").text
    batches = metric(after, "ood_batch_size_count", 'model="digits"') - count_before
    images = metric(after, "ood_batch_size_sum", 'model="digits"') - metric(
        before, "ood_batch_size_sum", 'model="digits"'
    )
    assert images == 200
    assert batches < 200  # some forward held more than one image
    assert metric(after, "ood_batch_size_bucket", 'le="1.0",model="digits"') < metric(
        after, "ood_batch_size_count", 'model="digits"'
    )
    assert (
        metric(after, "ood_http_requests_total", 'method="POST",route="/v1/models/{model}/score",status="200"') >= 200
    )
