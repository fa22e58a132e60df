"""The demo over real HTTP: uvicorn on a free 127.0.0.1 port: every route, the state lifecycle, auth on every
write, a rejected upload, every error case (a second server with tight limits) and 200 concurrent clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ood_core.detector import EnergyBased, Mahalanobis
from ood_core.state import save_detector
from service.demo import DEFAULT_DETECTOR
from service.settings import Settings, load_settings
from tests.service.conftest import API_KEY, AUTH, digit_png, noise_png, png_bytes, serve
from tests.service.jobs.archives import digits_zip, wait_job

STATE = {"Content-Type": "application/octet-stream"}
WRITE = {**AUTH, **STATE}

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
    png = base64.b64encode(digit_png(1)).decode()

    def scored() -> dict:
        response = httpx.post(
            f"{live_server}/v1/models/digits/score?detectors=http-energy", json={"instances": [{"b64": png}]}
        )
        assert response.status_code == 200, response.text
        detectors = response.json()["results"][0]["detectors"]
        assert set(detectors) == {"http-energy"}
        return detectors["http-energy"]

    first = save_detector(EnergyBased(t=0.5))
    assert httpx.put(url, content=first, headers=STATE).status_code == 401
    created = httpx.put(url, content=first, headers=WRITE)
    assert created.status_code == 201 and created.json()["version"] == 1
    v1 = scored()
    second = save_detector(EnergyBased(t=4.0))
    replaced = httpx.put(url, content=second, headers=WRITE)
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    v2 = scored()
    assert v2["version"] == 2 and v2["score"] != pytest.approx(v1["score"])  # the new state scores
    download = httpx.get(url)
    assert download.content == second and download.headers["etag"] == f'"{hashlib.sha256(second).hexdigest()}"'
    listed = {d["name"]: d for d in httpx.get(f"{live_server}/v1/models/digits/detectors").json()["detectors"]}
    assert (
        listed["http-energy"]["version"] == 2 and listed["http-energy"]["sha256"] == hashlib.sha256(second).hexdigest()
    )
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers=AUTH).status_code == 204
    assert httpx.get(url).status_code == 404
    assert "http-energy" not in httpx.get(f"{live_server}/v1/models/digits").json()["detectors"]


def test_rejected_upload_over_http_keeps_the_active_state(live_server: str) -> None:
    url = f"{live_server}/v1/models/digits/detectors/mahalanobis"
    before = httpx.get(url).content
    wrong_dim = save_detector(Mahalanobis().fit_features(torch.randn(30, 16), torch.arange(30) % 6))
    response = httpx.put(url, content=wrong_dim, headers=WRITE)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "dimension 16" in response.json()["detail"]
    assert httpx.get(url).content == before
    files = [("files", ("d.png", digit_png(0))), ("files", ("n.png", noise_png(0)))]
    digit, noise = httpx.post(f"{live_server}/v1/models/digits/score?detectors=mahalanobis", files=files).json()[
        "results"
    ]
    assert digit["detectors"]["mahalanobis"]["is_ood"] is False and noise["detectors"]["mahalanobis"]["is_ood"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/models/digits/detectors/auth-check"),
        ("DELETE", "/v1/models/digits/detectors/knn"),
        ("POST", "/v1/models/digits/detectors/auth-check/fit"),
        ("POST", "/v1/models/digits/detectors/knn/rollback"),
        ("DELETE", "/v1/jobs/0123456789abcdef"),
    ],
)
def test_every_write_needs_a_valid_key_over_http(live_server: str, method: str, path: str) -> None:
    data = save_detector(EnergyBased())
    for headers, status in ((STATE, 401), ({**STATE, "Authorization": "Bearer wrong"}, 403)):
        response = httpx.request(method, f"{live_server}{path}", content=data, headers=headers)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
    assert "knn" in httpx.get(f"{live_server}/v1/models/digits").json()["detectors"]
    assert "auth-check" not in httpx.get(f"{live_server}/v1/models/digits").json()["detectors"]


def test_every_route_answers_over_http(live_server: str) -> None:
    """Calls every route of the OpenAPI description with a successful request; /metrics must then count a 2xx
    for each (method, route): a route added without a test here fails this test."""
    digits = f"{live_server}/v1/models/digits"
    png = digit_png(2)
    train = [("files", (f"{i}.png", digit_png(i, split="train"))) for i in range(12)]
    _, labels = __import__("ood_core.data", fromlist=["load_split"]).load_split("train")
    fit = {
        "detector_class": "KNN",
        "hparams": json.dumps({"k": 1}),
        "labels": ",".join(str(int(v)) for v in labels[:12]),
    }
    slow = digits_zip(per_class=100, ood=0, repeat=4)
    zipped = {**AUTH, "Content-Type": "application/zip"}
    slow_fit = f"{digits}/detectors/route-slow/fit?detector_class=KNN&batch_size=1"
    running = httpx.post(slow_fit, content=slow, headers=zipped)
    queued = httpx.post(f"{digits}/detectors/route-slow/fit?detector_class=KNN", content=digits_zip(), headers=zipped)
    fitted = httpx.post(f"{digits}/detectors/route-fit/fit", files=train, data=fit, headers=AUTH)
    calls = [
        httpx.delete(f"{live_server}/v1/jobs/{queued.json()['id']}", headers=AUTH),
        httpx.delete(f"{live_server}/v1/jobs/{running.json()['id']}", headers=AUTH),
        httpx.get(f"{live_server}/v1/jobs/{running.json()['id']}/events"),
        httpx.get(f"{live_server}/v1/jobs"),
        httpx.get(f"{live_server}/v1/jobs/{fitted.json()['id']}"),
        httpx.get(f"{digits}/detectors/knn/versions"),
        httpx.post(f"{digits}/detectors/knn/rollback", json={"version": 1}, headers=AUTH),
        httpx.get(f"{live_server}/healthz"),
        httpx.get(f"{live_server}/readyz"),
        httpx.get(f"{live_server}/metrics"),
        httpx.get(f"{live_server}/v1/models"),
        httpx.get(digits),
        httpx.get(f"{digits}/detectors"),
        httpx.get(f"{digits}/detectors/knn"),
        httpx.put(f"{digits}/detectors/route-check", content=save_detector(EnergyBased()), headers=WRITE),
        httpx.post(f"{digits}/score", files=[("files", ("d.png", png))]),
        httpx.post(f"{live_server}/v1/models/digits-seg/segment?format=json", files=[("files", ("d.png", png))]),
        httpx.delete(f"{digits}/detectors/route-check", headers=AUTH),
    ]
    assert [running.status_code, queued.status_code, fitted.status_code] == [202] * 3
    assert [c.status_code for c in calls] == [200] * 14 + [201, 200, 200, 204], [c.text for c in calls]
    assert [c.json()["state"] for c in calls[:2]] == ["cancelled", "cancelled"]
    with httpx.Client(base_url=live_server) as client:
        assert wait_job(client, fitted.json()["id"])["state"] == "done"
    assert httpx.delete(f"{digits}/detectors/route-fit", headers=AUTH).status_code == 204
    assert calls[12].json()["detectors"]
    infer = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]
    }
    v2_reads = ("", "/health/live", "/health/ready", "/models/digits", "/models/digits/ready")
    v2 = [httpx.get(f"{live_server}/v2{path}") for path in (*v2_reads, "/models/digits/versions/1")]
    v2 += [httpx.get(f"{live_server}/v2/models/digits/versions/1/ready")]
    v2 += [httpx.post(f"{live_server}/v2/models/digits{version}/infer", json=infer) for version in ("", "/versions/1")]
    assert [c.status_code for c in v2] == [200] * 9, [c.text for c in v2]  # the V2 protocol (tests/service/api/v2/)
    assert httpx.get(f"{digits}/drift").status_code == 200
    assert httpx.get(f"{live_server}/").status_code == 200  # the console
    text = httpx.get(f"{live_server}/metrics").text
    paths = httpx.get(f"{live_server}/openapi.json").json()["paths"]
    for path, methods in paths.items():
        for method in methods:
            pattern = rf'^ood_http_requests_total{{method="{method.upper()}",route="{re.escape(path)}",status="2\d\d"}}'
            assert re.search(pattern, text, flags=re.M), f"{method.upper()} {path} not exercised over HTTP"


@pytest.fixture(scope="module")
def limited_server(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    states = tmp_path_factory.mktemp("limited-states")
    shutil.copytree(demo_state_dir, states, dirs_exist_ok=True)
    settings = load_settings(
        state_dir=states, api_keys=API_KEY, max_body_mb=0.05, max_images_per_request=2, max_pixels=64 * 64, max_queue=2
    )
    with serve(settings) as url:
        yield url


def test_each_error_case_over_http(limited_server: str) -> None:
    score = f"{limited_server}/v1/models/digits/score"
    wide = png_bytes(np.zeros((65, 64), dtype=np.uint8))
    cases = [
        (httpx.get(f"{limited_server}/v1/models/nope"), 404, "nope"),
        (httpx.post(f"{score}?detectors=nope", files=[("files", ("d", digit_png(0)))]), 404, "nope"),
        (httpx.get(f"{limited_server}/v1/models/digits/detectors/nope"), 404, "nope"),
        (httpx.post(score, content=b"hi", headers={"Content-Type": "text/plain"}), 415, "text/plain"),
        (httpx.post(score, files=[("files", ("junk.png", b"not an image"))]), 422, "junk.png"),
        (httpx.post(score, files=[("files", (str(i), digit_png(i))) for i in range(3)]), 413, "limit is 2"),
        (httpx.post(score, files=[("files", ("wide.png", wide))]), 413, "4160 pixels"),
        (httpx.post(score, files=[("files", ("big.png", b"\0" * 80_000))]), 413, "exceeds the limit"),
        (httpx.put(f"{limited_server}/v1/models/digits/detectors/x", content=b"junk", headers=WRITE), 422, "truncated"),
        (httpx.get(f"{limited_server}/v1/models/digits/detectors/bad%20name"), 422, "invalid detector name"),
    ]
    for response, status, word in cases:
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        body = response.json()
        assert body["status"] == status and word in body["detail"], body
        assert body["request_id"] == response.headers["x-request-id"]


def test_full_queue_is_429_with_retry_after_over_http(limited_server: str) -> None:
    png = digit_png(0)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited_server, timeout=60) as client:
            files = [("files", ("a", png)), ("files", ("b", png))]
            return await asyncio.gather(*(client.post("/v1/models/digits/score", files=files) for _ in range(24)))

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"].startswith("application/problem+json")


def test_expired_request_is_504_over_http(make_settings: Callable[..., Settings]) -> None:
    with serve(make_settings(request_timeout_s=1e-6)) as url:
        response = httpx.post(f"{url}/v1/models/digits/score", files=[("files", ("d", digit_png(0)))])
    assert response.status_code == 504 and response.headers["content-type"].startswith("application/problem+json")


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
