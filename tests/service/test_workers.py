"""``OOD_WORKERS=2``: the real entry point runs a supervisor and two worker processes on one port; a worker takes
connections only once ready, each answers with its own model, a state uploaded through one is served by both
after a sync, SIGTERM stops all of them with exit status 0, and a start-up failure stops the supervisor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torchvision
from safetensors.torch import save_file

from tests.service.conftest import AUTH, ROOT, digit_png, subprocess_server

pytestmark = pytest.mark.timeout(240)


def workers(pid: int) -> list[int]:
    """The worker processes of supervisor ``pid`` (multiprocessing spawns them; its resource tracker is not one)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            found.append(int(child))
    return found


def ready(url: str) -> bool:
    """``/readyz`` over a NEW connection (the kernel hands it to either worker)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.get("/readyz").status_code == 200


def served_detectors(url: str) -> set[str]:
    """The detectors of ``digits`` as seen over a NEW connection (the kernel hands it to either worker)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        answer = client.get("/v1/models/digits/detectors")
        assert answer.status_code == 200, answer.text
        return {d["name"] for d in answer.json()["detectors"]}


def test_two_workers_serve_one_port_share_states_and_stop_cleanly(demo_state_dir: Path, tmp_path: Path) -> None:
    states = tmp_path / "states"
    shutil.copytree(demo_state_dir, states)
    with subprocess_server(states, tmp_path / "log.txt", OOD_WORKERS="2", OOD_STATE_SYNC_S="0.5") as (url, process):
        deadline = time.monotonic() + 60
        while len(workers(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers(process.pid)) == 2
        log = tmp_path / "log.txt"
        deadline = time.monotonic() + 90  # a worker accepts connections once ready: wait for the second one too
        while log.read_text().count('"service ready"') < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(ready(url) for _ in range(10))  # never a "warming up" from a worker that accepted early
        png = digit_png(0)
        answers = []
        for _ in range(12):  # fresh connections: both workers answer, the same way
            with httpx.Client(base_url=url, timeout=30) as client:
                response = client.post("/v1/models/digits/score", files=[("files", ("0.png", png))])
                assert response.status_code == 200
                answers.append(response.json())
        assert all(answer == answers[0] for answer in answers)
        with httpx.Client(base_url=url, timeout=30) as client:
            state = client.get("/v1/models/digits/detectors/energy").content
            put = client.put("/v1/models/digits/detectors/energy-copy", content=state, headers=AUTH)
            assert put.status_code == 201, put.text
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # every worker loads it at its next sync
            if all("energy-copy" in served_detectors(url) for _ in range(8)):
                break
            time.sleep(0.5)
        assert all("energy-copy" in served_detectors(url) for _ in range(8))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def test_a_worker_whose_models_do_not_build_stops_the_supervisor_with_status_3(tmp_path: Path) -> None:
    """Weights of another architecture: every worker's start-up fails, and instead of restarting them forever or
    answering 503, the supervisor exits at once with uvicorn's start-up-failure status."""
    save_file(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), str(tmp_path / "r18.st"))
    config = {
        "state_dir": str(tmp_path / "states"),
        "api_keys": "k",
        "models": [
            {
                "name": "bad",
                "architecture": "resnet34",
                "weights": str(tmp_path / "r18.st"),
                "num_classes": 3,
                "input_size": 32,
                "nodes": {"logits": "fc"},
            }
        ],
    }
    (tmp_path / "bad.json").write_text(json.dumps(config))
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--config", str(tmp_path / "bad.json")],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OOD_")}, "OOD_WORKERS": "2"},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 3
    assert time.monotonic() - began < 60  # not after a health-check timeout
    assert b"worker start-up failed" in done.stderr
