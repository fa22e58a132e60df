"""Every error case answers application/problem+json with the documented status (in-process, tight limits)."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
import pytest

from service.settings import ModelConfig, NodesConfig, Settings
from tests.service.conftest import AUTH, AppRunner, digit_png, noise_png, png_bytes

pytestmark = pytest.mark.timeout(120)
SCORE = "/v1/models/digits/score"


@pytest.fixture(scope="module")
def app(module_settings: Settings) -> Iterator[AppRunner]:
    limited = module_settings.model_copy(
        update={"max_body_mb": 0.05, "max_images_per_request": 2, "max_pixels": 64 * 64, "max_queue": 2}
    )
    runner = AppRunner(limited)
    yield runner
    runner.close()


def assert_problem(response, status: int, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["instance"]
    for word in words:
        assert word in body["detail"], body["detail"]


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width x height`` (its pixel data could never be decoded to that)."""
    data = bytearray(png_bytes(np.zeros((1, 1), dtype=np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_wrong_content_type_is_415(app: AppRunner) -> None:
    assert_problem(app.post(SCORE, content=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain")
    assert_problem(app.post(SCORE, content=b"hello"), 415)


def test_too_many_images_is_413(app: AppRunner) -> None:
    files = [("files", (str(i), digit_png(i))) for i in range(3)]
    assert_problem(app.post(SCORE, files=files), 413, "3 images", "limit is 2")


def test_oversized_body_is_413_with_and_without_content_length(app: AppRunner) -> None:
    big = b"\0" * 80_000
    assert_problem(app.post(SCORE, files=[("files", ("big.png", big))]), 413, "exceeds the limit")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 10_000

    headers = {"Content-Type": "application/json"}
    assert_problem(app.post(SCORE, content=chunks(), headers=headers), 413, "exceeds the limit")


def test_state_uploads_have_their_own_size_limit(app: AppRunner, module_settings: Settings) -> None:
    state = app.get("/v1/models/digits/detectors/knn").content
    assert len(state) > app.context.settings.max_body_bytes  # a feature bank is larger than any image request
    response = app.put("/v1/models/digits/detectors/knn-big", content=state, headers=AUTH)
    assert response.status_code == 201, response.text
    assert app.delete("/v1/models/digits/detectors/knn-big", headers=AUTH).status_code == 204

    runner = AppRunner(module_settings.model_copy(update={"max_state_mb": 0.01}))
    try:
        assert_problem(runner.put("/v1/models/digits/detectors/knn-big", content=state, headers=AUTH), 413, "limit")
        assert "knn-big" not in {d["name"] for d in runner.get("/v1/models/digits/detectors").json()["detectors"]}
    finally:
        runner.close()


def test_image_with_too_many_pixels_is_413_before_decoding(app: AppRunner) -> None:
    bomb = png_claiming_size(100_000, 100_000)
    assert_problem(app.post(SCORE, files=[("files", ("bomb.png", bomb))]), 413, "10000000000 pixels")
    wide = png_bytes(np.zeros((65, 64), dtype=np.uint8))
    assert_problem(app.post(SCORE, files=[("files", ("wide.png", wide))]), 413, "wide.png")


def test_undecodable_images_are_422(app: AppRunner) -> None:
    assert_problem(app.post(SCORE, files=[("files", ("junk.png", b"not an image"))]), 422, "junk.png")
    truncated = noise_png(0)[:60]
    assert_problem(app.post(SCORE, files=[("files", ("cut.png", truncated))]), 422, "cut.png")
    assert_problem(app.post(SCORE, json={"instances": [{"b64": "@@@"}]}), 422, "instances[0]")
    junk = base64.b64encode(b"zzz").decode()
    assert_problem(app.post(SCORE, json={"instances": [{"b64": junk}]}), 422, "instances[0]")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, ("not valid JSON",)),
        ({"json": {"images": []}}, ("instances",)),
        ({"json": {"instances": []}}, ("no images",)),
        ({"files": [("other", ("a.png", b"x"))]}, ("no images",)),
    ],
)
def test_malformed_requests_are_400(app: AppRunner, kwargs: dict, words: tuple[str, ...]) -> None:
    assert_problem(app.post(SCORE, **kwargs), 400, *words)


def test_unknown_routes_and_methods(app: AppRunner) -> None:
    assert_problem(app.get("/v3/nothing"), 404)  # (under /v2: the V2 protocol's error body, tests/service/api/v2/)
    assert_problem(app.request("PATCH", "/v1/models"), 405)


def test_full_queue_is_429_with_retry_after(app: AppRunner) -> None:
    png = digit_png(0)

    async def burst() -> list:
        requests = [app.client.post(SCORE, files=[("files", ("a", png)), ("files", ("b", png))]) for _ in range(24)]
        return await asyncio.gather(*requests)

    responses = app.call(burst())
    codes = sorted({r.status_code for r in responses})
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert_problem(refused, 429, "queue is full")


def test_expired_request_is_504(make_settings: Callable[..., Settings]) -> None:
    runner = AppRunner(make_settings(request_timeout_s=1e-6))
    try:
        assert_problem(runner.post(SCORE, files=[("files", ("a", digit_png(0)))]), 504)
    finally:
        runner.close()


def test_failed_start_up_is_not_ready(make_settings: Callable[..., Settings]) -> None:
    broken = ModelConfig(
        name="broken", architecture="resnet18", num_classes=3, input_size=(32, 32), nodes=NodesConfig(logits="fc")
    )
    settings = make_settings(models=[broken])
    with pytest.raises(RuntimeError, match="safetensors"):
        AppRunner(settings)


def test_not_ready_before_start_up(module_settings: Settings) -> None:
    """Without the lifespan having run, liveness answers but readiness and the API say 503."""
    import httpx

    from service.app import create_app

    async def probe() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(module_settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return [await client.get(p) for p in ("/healthz", "/readyz", "/v1/models", "/v1/models/digits")]

    health, ready, models, model = asyncio.run(probe())
    assert health.status_code == 200
    for response in (ready, models, model):
        assert_problem(response, 503, "warming up")
        assert response.headers["retry-after"] == "1"


def test_every_service_and_batcher_error_has_a_status_in_the_one_table() -> None:
    from service import errors
    from service.api.problems import status_table
    from service.engine.batcher import BatcherError

    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s, *subclasses(s)}}

    table = status_table()
    missing = {c.__name__ for c in subclasses(errors.ServiceError) | subclasses(BatcherError) if c not in table}
    assert not missing
    assert all(400 <= status < 600 for status, _ in table.values())


def test_unexpected_error_is_500_problem_json_without_internals(
    app: AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from service.api.routes import models
    from service.engine.served_model import ServedModel

    def broken(model: ServedModel) -> dict:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(models, "model_info", broken)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return await client.get("/v1/models/digits", headers={"X-Request-ID": "req-500"})

    response = app.call(get())
    assert_problem(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert response.json()["detail"] == "internal error" and response.json()["title"] == "Internal server error"
    assert response.json()["request_id"] == response.headers["x-request-id"] == "req-500"


def test_limits_set_through_the_environment_are_enforced(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.app import create_app

    env = {
        "OOD_STATE_DIR": str(make_settings().state_dir),
        "OOD_API_KEYS": "env-key",
        "OOD_MAX_IMAGES_PER_REQUEST": "1",
        "OOD_MAX_PIXELS": str(40 * 40),
        "OOD_MAX_BODY_MB": "0.02",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = AppRunner(create_app())  # no settings given: read from the environment now
    try:
        two = [("files", ("a", digit_png(0))), ("files", ("b", digit_png(1)))]
        assert_problem(runner.post(SCORE, files=two), 413, "limit is 1")
        wide = png_bytes(np.zeros((40, 41), dtype=np.uint8))
        assert_problem(runner.post(SCORE, files=[("files", ("w.png", wide))]), 413, "1640 pixels")
        assert_problem(runner.post(SCORE, files=[("files", ("big", b"\0" * 30_000))]), 413, "exceeds the limit")
        assert runner.post(SCORE, files=two[:1]).status_code == 200
        assert (
            runner.delete("/v1/models/digits/detectors/knn", headers={"Authorization": "Bearer env-key"}).status_code
            == 204
        )
    finally:
        runner.close()
