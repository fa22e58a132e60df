"""The scoring lane (``service/api/scoring_lane.py``): ``POST /score`` and ``/segment`` skip FastAPI's router but
answer exactly what the full stack answers (status, content type, body), errors included, and keep the request
metrics' route label; other methods on these paths still go through FastAPI."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from service.api.scoring_lane import ScoringLane
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, digit_png, noise_png, serve


def without_lane(settings: Settings) -> FastAPI:
    app = create_app(settings)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not ScoringLane]
    return app


@pytest.fixture(scope="module")
def both(module_settings: Settings) -> Iterator[tuple[str, str]]:
    lane_app = create_app(module_settings)
    assert any(m.cls is ScoringLane for m in lane_app.user_middleware)
    with serve(module_settings, lane_app) as lane, serve(module_settings, without_lane(module_settings)) as plain:
        yield lane, plain


def image(data: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"files": ("x.png", data, "image/png")}


CASES = [
    ("POST", "/v1/models/digits/score", {}, image(digit_png(0)), None),
    ("POST", "/v1/models/digits/score?detectors=energy&detectors=msp&tpr=0.9", {}, image(digit_png(7)), None),
    ("POST", "/v1/models/digits/score?threshold=0.5", {}, image(noise_png(3)), None),
    ("POST", "/v1/models/digits/score?tpr=2", {}, image(digit_png(0)), None),  # 422: query
    ("POST", "/v1/models/digits/score?detectors=nope", {}, image(digit_png(0)), None),  # 404: detector
    ("POST", "/v1/models/nope/score", {}, image(digit_png(0)), None),  # 404: model
    ("POST", "/v1/models/digits-seg/score", {}, image(digit_png(0)), None),  # 422: wrong task
    ("POST", "/v1/models/digits/score", {}, image(b"not an image"), None),  # 422: decode
    ("POST", "/v1/models/digits/score", {"content-type": "text/plain"}, None, b"hello"),  # 415
    ("POST", "/v1/models/digits/score", {}, None, None),  # no body
    ("GET", "/v1/models/digits/score", {}, None, None),  # 405, through FastAPI
    ("POST", "/v1/models/digits/score/", {}, image(digit_png(0)), None),  # not the lane's path
    ("POST", "/v1/models/digits-seg/segment?format=json&size=8x8", {}, image(digit_png(1)), None),
    ("POST", "/v1/models/digits-seg/segment?size=huge", {}, image(digit_png(1)), None),  # 422: query
]


@pytest.mark.parametrize(("method", "path", "headers", "files", "content"), CASES)
def test_the_lane_answers_what_the_full_stack_answers(
    both: tuple[str, str],
    method: str,
    path: str,
    headers: dict[str, str],
    files: dict[str, tuple[str, bytes, str]] | None,
    content: bytes | None,
) -> None:
    answers = []
    for base in both:
        sent = {"x-api-key": API_KEY, "x-request-id": "same-on-both", **headers}  # the id is in problem bodies
        with httpx.Client(base_url=base, headers=sent, timeout=30.0) as client:
            response = client.request(method, path, files=files, content=content, follow_redirects=False)
        answers.append((response.status_code, response.headers.get("content-type"), response.content))
        assert response.headers["x-request-id"] == "same-on-both" and response.headers["server"] == "ood-serve"
    assert answers[0] == answers[1]


def test_request_metrics_keep_the_route_template(both: tuple[str, str]) -> None:
    lane, _ = both
    with httpx.Client(base_url=lane, headers={"x-api-key": API_KEY}, timeout=30.0) as client:
        assert client.post("/v1/models/digits/score", files=image(digit_png(2))).status_code == 200
        metrics = client.get("/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("ood_http_requests_total{")]
    assert any('route="/v1/models/{model}/score"' in line and 'status="200"' in line for line in lines), lines
