"""Shared fixtures for the service tests.

* ``demo_state_dir`` (session): a folder with the demo's detector states, fitted once per test session.
* ``make_settings`` (function): ``make_settings(**overrides) -> Settings`` with a fresh copy of those states,
  ``API_KEY`` as the only key and no config file.
* ``start_app(settings) -> AppRunner``: the app with its lifespan running on a background event loop, plus a
  synchronous ``httpx.AsyncClient`` bridge over ``ASGITransport`` (in-process); close with ``runner.close()``.
* ``serve(settings)``: context manager running a real uvicorn server (127.0.0.1, free port) until ready; yields
  its base URL. ``live_server`` (module): such a server with the demo.
* ``wait_until_ready(url, timeout_s, alive)``: poll ``/readyz`` of a server started in a thread or a subprocess.
* ``png_bytes(array)``: encode a ``H x W`` / ``H x W x 3`` uint8 array as PNG; ``digit_png()`` / ``noise_png()``.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.server import uvicorn_config
from service.settings import Settings, load_settings

API_KEY = "test-key-0123456789"

# The batch workers' thread plan is measured at every app start (~0.8 s on the demo's two models, times the
# suite's hundreds of starts); the suite runs them on one intra-op thread instead, and tests/service/engine/
# test_threads.py checks the measured plan itself (it sets intra_op_threads explicitly).
os.environ.setdefault("OOD_INTRA_OP_THREADS", "1")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_png(index: int = 0, split: str = "test") -> bytes:
    """An ID test digit (0-5) as an 8-bit grayscale 32x32 PNG."""
    from ood_core.data import load_split

    images, _ = load_split(split)
    return png_bytes((images[index, 0].numpy() * 255).round().astype(np.uint8))


def noise_png(seed: int = 0, size: int = 32) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


class AppRunner:
    """Runs the app's lifespan on an event loop in a background thread; ``call`` runs a coroutine there."""

    def __init__(self, settings: Settings | FastAPI) -> None:
        self.app = settings if isinstance(settings, FastAPI) else create_app(settings)
        self.context = self.app.state.context
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.call(self._lifespan.__aenter__())
        try:
            self.call(self.context.wait_ready(120.0))
        except BaseException:
            self.call(self._lifespan.__aexit__(None, None, None))
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://service")

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.call(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self.call(self.client.aclose())
        self.call(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class NoLifespanClient:
    """Requests to an app whose lifespan never runs (start-up never begins: the service stays warming up),
    through httpx's ``ASGITransport``, one event loop per call."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(send())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture(scope="session")
def demo_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo detector states fitted once (the first app start writes them; later starts only load)."""
    folder = tmp_path_factory.mktemp("demo-states")
    runner = AppRunner(load_settings(state_dir=folder, api_keys=API_KEY))
    runner.close()
    return folder


@pytest.fixture
def make_settings(demo_state_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        states = tmp_path / f"states-{time.monotonic_ns()}"
        shutil.copytree(demo_state_dir, states)
        values: dict[str, Any] = {"state_dir": states, "api_keys": API_KEY}
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture(scope="module")
def module_settings(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Demo settings with a private copy of the states, shared by one test module."""
    states = tmp_path_factory.mktemp("states")
    shutil.copytree(demo_state_dir, states, dirs_exist_ok=True)
    return load_settings(state_dir=states, api_keys=API_KEY)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_until_ready(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``{url}/readyz`` until it answers 200; fail if ``alive()`` turns false or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert alive(), f"the server behind {url} stopped before it was ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} not ready within {timeout_s} s")


@contextmanager
def serve(settings: Settings, app: FastAPI | None = None) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 (free port) in a background thread (of ``app``, default the service
    built from ``settings``); yields its base URL once ready."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn_config(app if app is not None else create_app(settings), settings, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 120.0, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def live_server(module_settings: Settings) -> Iterator[str]:
    """A real uvicorn server with the demo on 127.0.0.1 (free port); yields its base URL once ready."""
    with serve(module_settings) as url:
        yield url


@contextmanager
def subprocess_server(states: Path, log_path: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m service`` (the real entry point) on a free loopback port serving ``states``, with the API key
    set and no replica sync; ``env`` adds ``OOD_*`` variables. Yields its URL and process once ready; stops it (a
    killed one is left killed). On a failure the end of its log is printed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # a free port, released for the server
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    variables = {k: v for k, v in os.environ.items() if not k.startswith("OOD_")}
    variables.update({"OOD_STATE_DIR": str(states), "OOD_API_KEYS": API_KEY, "OOD_STATE_SYNC_S": "0", **env})
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=variables,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, 90.0, alive=lambda: process.poll() is None)
            yield url, process
        except BaseException:
            print(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
