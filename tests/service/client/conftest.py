"""Fixtures of the client tests: ``scripted_server``, a tiny ASGI app on a real uvicorn server (127.0.0.1, free
port) that answers from a script (e.g. 429 then 200) and records what it received."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from tests.service.conftest import free_socket


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class ScriptedApp:
    """Answers each request with the next ``(status, headers, body)`` of ``script``; then ``final`` forever."""

    script: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    final: tuple[int, dict[str, str], bytes] = (200, {"content-type": "application/json"}, b'{"models": []}')
    received: list[Received] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(Received(scope["method"], scope["path"], headers, body, time.monotonic()))
        if scope["path"] == "/readyz":
            status, answer_headers, answer = 200, {"content-type": "application/json"}, b'{"status": "ready"}'
        else:
            status, answer_headers, answer = self.script.pop(0) if self.script else self.final
        raw = [(k.encode(), v.encode()) for k, v in answer_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": answer})


def problem(status: int, retry_after: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/problem+json"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    body = {"type": "about:blank", "title": "busy", "status": status, "detail": "try later", "instance": "/v1/models"}
    return status, headers, json.dumps(body).encode()


@contextmanager
def serve_app(app: ScriptedApp) -> Iterator[str]:
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/readyz", timeout=1.0)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline and thread.is_alive(), "the scripted server did not start"
            time.sleep(0.05)
    app.received.clear()
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedApp, str]]:
    app = ScriptedApp()
    with serve_app(app) as url:
        yield app, url
