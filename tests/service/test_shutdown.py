"""Graceful shutdown of a real server process: SIGTERM under concurrent load loses no accepted request.

``python -m service --host 127.0.0.1 --port P --config FILE`` (the demo; the file sets only the state directory)
runs on a free loopback port. Twelve closed-loop clients send
score requests of 64 images each, so that a request spends a few hundred milliseconds in the server; SIGTERM
arrives mid-load. Every request that got a response must have got a 200 (no 5xx from a batcher stopped under a
running request); every request that had been in the server for ACCEPTED_AGE_S when the signal came (surely read
and accepted) must be answered with a 200; the only failures allowed are connection-level ones after shutdown
began (refused, or closed before the server read the request); and the process must exit 0. Its log must be JSON
lines with a request id on every access line, and (no key configured) the generated API key logged once.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import wait_until_ready

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 12
IMAGES_PER_REQUEST = 64  # 768 images in flight: under the default queue of 1024 (no 429), yet a queue
ACCEPTED_AGE_S = 0.1  # a request sent this long ago over loopback has surely been read by the server
READY_TIMEOUT_S = 60.0  # start-up imports torch and may fit the demo states; the machine is shared
LOAD_BEFORE_SIGTERM_S = 2.0
EXIT_TIMEOUT_S = 20.0


@dataclass
class Outcome:
    sent_at: float
    done_at: float
    status: int | None  # None: no response
    error: str = ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def noise_png(height: int, width: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def load_until_shutdown(process: subprocess.Popen[bytes], url: str, model: str, image: bytes) -> float:
    """Run the clients, send SIGTERM after LOAD_BEFORE_SIGTERM_S once a request was answered and while one has been
    in the server for ACCEPTED_AGE_S; return the time the signal was sent."""
    outcomes: list[Outcome] = []
    in_flight: dict[int, float] = {}  # client index -> when its current request was sent
    sigterm_at = float("inf")

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        files = [("files", (f"noise{i}.png", image, "image/png")) for i in range(IMAGES_PER_REQUEST)]
        while True:
            sent_at = in_flight[index] = time.monotonic()
            try:
                response = await client.post(f"/v1/models/{model}/score", files=files)
                outcomes.append(Outcome(sent_at, time.monotonic(), response.status_code, response.text[:200]))
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as error:
                outcomes.append(Outcome(sent_at, time.monotonic(), None, repr(error)))
                if sent_at >= sigterm_at or process.poll() is not None:
                    return  # shutdown began: refused or closed before the request was read
            finally:
                in_flight.pop(index, None)
            if process.poll() is not None:
                return

    async with httpx.AsyncClient(base_url=url, timeout=15.0, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        clients = [asyncio.create_task(client_loop(client, i)) for i in range(CLIENTS)]
        started = time.monotonic()

        # at least LOAD_BEFORE_SIGTERM_S of load, some answered requests (a loaded machine may be slow), and a
        # request in the server for ACCEPTED_AGE_S, so that the signal surely lands on an accepted request
        def in_flight_long_enough() -> bool:
            now = time.monotonic()
            return any(now - sent >= ACCEPTED_AGE_S for sent in in_flight.values())

        while (
            time.monotonic() - started < LOAD_BEFORE_SIGTERM_S
            or not any(o.status == 200 for o in outcomes)
            or not in_flight_long_enough()
        ):
            assert time.monotonic() - started < READY_TIMEOUT_S, "no request was answered under load"
            await asyncio.sleep(0.05)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), EXIT_TIMEOUT_S)

    before = [o for o in outcomes if o.done_at < sigterm_at]
    assert before and all(o.status == 200 for o in before), [o for o in before if o.status != 200][:3]
    answered = [o for o in outcomes if o.status is not None]
    assert all(o.status == 200 for o in answered), [o for o in answered if o.status != 200][:3]
    dropped = [o for o in outcomes if o.status is None and o.sent_at < sigterm_at and o.done_at < sigterm_at]
    assert not dropped, dropped[:3]  # a connection error before shutdown began is a failure
    accepted = [o for o in outcomes if o.sent_at < sigterm_at - ACCEPTED_AGE_S and o.done_at > sigterm_at]
    assert accepted, "no request was in flight at SIGTERM: the test did not exercise the drain"
    assert all(o.status == 200 for o in accepted), [o for o in accepted if o.status != 200][:3]
    return sigterm_at


def check_json_logs(text: str) -> None:
    """The process's log (its stderr): one JSON object per line, uvicorn's own lines included; one access line per
    request with its request id, route and status; the generated API key logged exactly once."""
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    access = [e for e in entries if e.get("logger") == "service.access"]
    scored = [e for e in access if e["route"] == "/v1/models/{model}/score" and e["status"] == 200]
    assert scored and all(re.fullmatch(r"[0-9a-f]{32}", e["request_id"]) for e in access)
    assert len({e["request_id"] for e in access}) == len(access)
    assert any(e.get("logger", "").startswith("uvicorn") for e in entries)
    assert sum(1 for e in entries if "api_key" in e) == 1


def test_sigterm_under_load_answers_accepted_requests_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("OOD_API_KEYS", "OOD_API_KEYS_FILE", "OOD_CONFIG")}
    env.update({"OOD_LOG_JSON": "true"})
    config = tmp_path / "serve.yaml"  # --config: the state directory comes from the file
    config.write_text(f"state_dir: {tmp_path / 'states'}\n")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(url, READY_TIMEOUT_S, alive=lambda: process.poll() is None)
            models = httpx.get(f"{url}/v1/models", timeout=10.0).json()["models"]
            model = next(m for m in models if m["task"] == "classification")
            height, width = model["input_size"]
            asyncio.run(load_until_shutdown(process, url, model["name"], noise_png(height, width)))
            assert process.wait(EXIT_TIMEOUT_S) == 0
            check_json_logs(log_path.read_text(errors="replace"))
            assert {p.name for p in (tmp_path / "states").iterdir() if not p.name.startswith(".")} == {
                "digits",
                "digits-seg",
            }
        except BaseException:
            print(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
