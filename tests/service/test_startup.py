"""Start-up and logs in-process: ready only after models, states and the warm-up batch; a generated API key when
none is configured; JSON log lines carrying the request id, also from work done in worker threads."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable

import httpx
import pytest

from ood_core.detector import EnergyBased
from ood_core.state import save_detector
from service.app import create_app
from service.context import ServiceContext
from service.settings import Settings
from tests.service.conftest import AUTH, AppRunner, digit_png

pytestmark = pytest.mark.timeout(120)
STATE = {"Content-Type": "application/octet-stream"}


def test_ready_only_after_models_states_and_warm_up(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    load_model = ServiceContext._load_model

    def held_load(self: ServiceContext, config):  # type: ignore[no-untyped-def]
        release.wait(60)
        return load_model(self, config)

    monkeypatch.setattr(ServiceContext, "_load_model", held_load)
    app = create_app(make_settings())

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                paths = ("/healthz", "/readyz", "/v1/models", "/v1/models/digits/score")
                early = [await client.get(p) for p in paths[:3]]
                early.append(await client.post(paths[3], files=[("files", ("d.png", digit_png(0)))]))
                release.set()
                await app.state.context.wait_ready(120)
                return early, await client.get("/readyz"), (await client.get("/metrics")).text

    early, ready, metrics = asyncio.run(scenario())
    assert early[0].status_code == 200  # alive while starting
    for response in early[1:]:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.headers["content-type"].startswith("application/problem+json")
    assert ready.status_code == 200 and ready.json()["models"] == ["digits", "digits-seg"]
    # no request was scored, yet each model already ran a full warm-up batch through its batcher
    for model in ("digits", "digits-seg"):
        match = re.search(rf'^ood_batch_size_sum{{model="{model}"}} (\S+)$', metrics, flags=re.M)
        assert match and float(match.group(1)) == 32.0


def test_generated_key_is_logged_once_and_guards_writes(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.auth"):
        runner = AppRunner(make_settings(api_keys=None))
    try:
        records = [r for r in caplog.records if hasattr(r, "api_key")]
        generated = [r.api_key for r in records]  # type: ignore[attr-defined]
        assert len(generated) == 1 and len(generated[0]) >= 32 and generated[0] in records[0].getMessage()
        url = "/v1/models/digits/detectors/guarded"
        data = save_detector(EnergyBased())
        assert runner.put(url, content=data, headers=STATE).status_code == 401
        assert runner.put(url, content=data, headers={**STATE, **AUTH}).status_code == 403  # the test key is not set
        key = {"Authorization": f"Bearer {generated[0]}"}
        assert runner.put(url, content=data, headers={**STATE, **key}).status_code == 201
        assert runner.delete(url, headers=key).status_code == 204
    finally:
        runner.close()


class _Lines(logging.Handler):
    """Formats records with the service's own (configured) formatter and keeps the lines."""

    def __init__(self, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_json_logs_carry_the_request_id(make_settings: Callable[..., Settings]) -> None:
    runner = AppRunner(make_settings(log_json=True))
    service_logger = logging.getLogger("service")
    lines = _Lines(service_logger.handlers[0].formatter)
    service_logger.addHandler(lines)
    try:
        headers = {**AUTH, **STATE, "X-Request-ID": "req-42"}
        put = runner.put("/v1/models/digits/detectors/logged", content=save_detector(EnergyBased()), headers=headers)
        assert put.status_code == 201 and put.headers["x-request-id"] == "req-42"
        generated = runner.get("/v1/models/nope")
    finally:
        service_logger.removeHandler(lines)
        runner.close()
    entries = [json.loads(line) for line in lines.lines]  # every line is one JSON object
    mine = [e for e in entries if e.get("request_id") == "req-42"]
    access = [e for e in mine if e["logger"] == "service.access"]
    assert len(access) == 1
    assert access[0]["status"] == 201 and access[0]["route"] == "/v1/models/{model}/detectors/{name}"
    assert access[0]["method"] == "PUT" and access[0]["duration_ms"] >= 0 and access[0]["level"] == "INFO"
    # logged from the thread pool that validated and stored the state: same request id
    assert any(e["message"] == "detector installed" and e["detector"] == "logged" for e in mine)
    other = [e for e in entries if e.get("request_id") == generated.headers["x-request-id"]]
    assert [e["status"] for e in other if e["logger"] == "service.access"] == [404]
