"""Retries over real HTTP (a scripted uvicorn server): 429 / 503 are sent again after ``Retry-After`` (or the
backoff), at most ``attempts`` times and never after waiting less than asked; other errors are raised at once with
their problem body."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from pathlib import Path

import httpx
import pytest

from service.client import AsyncOODClient, OODClient, ProblemError, Retry
from service.client.core import retry_after_s
from tests.service.client.conftest import ScriptedApp, problem
from tests.service.conftest import free_socket

pytestmark = pytest.mark.timeout(60)
INFO = {
    "name": "s",
    "version": 1,
    "sha256": "0" * 64,
    "size_bytes": 3,
    "detector_class": "EnergyBased",
    "uploaded_at": "2026-01-01T00:00:00Z",
    "input_kind": "logits",
    "calibrated": False,
    "default_threshold": None,
    "target_tpr": None,
}


def test_a_429_is_retried_after_its_retry_after(scripted: tuple[ScriptedApp, str]) -> None:
    app, url = scripted
    app.script = [problem(429, retry_after="1")]
    started = time.monotonic()
    with OODClient(url, api_key="k") as client:
        assert client.models() == []
    first, second = app.received
    assert second.at - first.at >= 1.0  # waited as told, no sooner (and no jitter to make it sooner)
    assert time.monotonic() - started < 5
    assert first.headers["authorization"] == second.headers["authorization"] == "Bearer k"


def test_a_503_without_retry_after_backs_off_by_doubling(scripted: tuple[ScriptedApp, str]) -> None:
    app, url = scripted
    app.script = [problem(503), problem(503)]
    waits: list[float] = []
    with OODClient(url, retry=Retry(backoff_s=0.05), sleep=waits.append) as client:
        assert client.models() == []
    assert waits == [0.05, 0.1] and len(app.received) == 3


def test_a_retry_after_longer_than_the_longest_wait_is_raised_at_once(scripted: tuple[ScriptedApp, str]) -> None:
    app, url = scripted
    app.script = [problem(429, retry_after="120")]
    waits: list[float] = []
    with OODClient(url, retry=Retry(max_wait_s=10), sleep=waits.append) as client, pytest.raises(ProblemError) as err:
        client.models()
    assert err.value.status == 429 and err.value.retry_after == "120" and err.value.attempts == 1
    assert err.value.problem.detail == "try later" and waits == [] and len(app.received) == 1


def test_attempts_are_bounded(scripted: tuple[ScriptedApp, str]) -> None:
    app, url = scripted
    app.script = [problem(503, retry_after="0")] * 5
    with OODClient(url, retry=Retry(attempts=3)) as client, pytest.raises(ProblemError) as err:
        client.models()
    assert err.value.status == 503 and err.value.attempts == 3 and len(app.received) == 3


def test_other_errors_are_not_retried_and_any_body_becomes_a_problem(scripted: tuple[ScriptedApp, str]) -> None:
    app, url = scripted
    app.script = [(502, {"content-type": "text/html"}, b"<html>bad gateway</html>"), problem(404)]
    with OODClient(url) as client:
        with pytest.raises(ProblemError) as err:
            client.models()
        assert (err.value.status, err.value.problem.title, err.value.detail) == (
            502,
            "Bad Gateway",
            "<html>bad gateway</html>",
        )
        with pytest.raises(ProblemError) as err:
            client.models()
        assert err.value.status == 404 and "404 busy: try later (GET /v1/models)" in str(err.value)
    assert len(app.received) == 2


def test_a_streamed_upload_is_sent_whole_again_on_a_retry(scripted: tuple[ScriptedApp, str], tmp_path: Path) -> None:
    app, url = scripted
    state = tmp_path / "s.safetensors"
    state.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, streamed from the file at each send
    app.script = [problem(429, retry_after="0"), (201, {"content-type": "application/json"}, json.dumps(INFO).encode())]
    with OODClient(url, api_key="k") as client:
        info = client.upload_state("digits", "s", state)
    assert info.name == "s" and info.version == 1
    first, second = app.received
    assert first.body == second.body == state.read_bytes()
    assert second.method == "PUT" and second.path == "/v1/models/digits/detectors/s"
    assert second.headers["content-length"] == str(state.stat().st_size)


def test_the_async_client_retries_the_same_way(scripted: tuple[ScriptedApp, str], tmp_path: Path) -> None:
    app, url = scripted
    state = tmp_path / "s.safetensors"
    state.write_bytes(b"abc" * 100_000)
    app.script = [
        problem(429, retry_after="1"),
        problem(503, retry_after="0"),
        (201, {"content-type": "application/json"}, json.dumps(INFO).encode()),
    ]

    async def scenario() -> None:
        async with AsyncOODClient(url, api_key="k") as client:
            assert (await client.upload_state("digits", "s", state)).sha256 == "0" * 64

    asyncio.run(scenario())
    first, second, third = app.received
    assert second.at - first.at >= 1.0 and first.body == second.body == third.body == state.read_bytes()
    assert third.headers["content-length"] == str(state.stat().st_size)


def test_a_refused_connection_is_retried_then_raised() -> None:
    sock = free_socket()  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    waits: list[float] = []
    try:
        retry = Retry(attempts=3, backoff_s=0.01)
        with OODClient(url, retry=retry, sleep=waits.append) as client, pytest.raises(httpx.ConnectError):
            client.models()
    finally:
        sock.close()
    assert waits == [0.01, 0.02]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("3") == 3.0 and retry_after_s(" 0 ") == 0.0 and retry_after_s("-4") == 0.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after_s(when) or 0) <= 30
    assert retry_after_s("soon") is None
