"""Faults of a real server process: SIGKILL in the middle of a state upload, and a full state volume.

After a kill and a restart every stored state matches its sha256, the old active version still serves, and no
upload or temp file is left; on a full volume (a small tmpfs) an upload gets 507 and the old state is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from ood_core.detector import KNN
from ood_core.state import save_detector
from tests.service.conftest import API_KEY, AUTH, digit_png, subprocess_server

pytestmark = pytest.mark.timeout(180)


def server_process(states: Path, log: Path) -> AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    return subprocess_server(states, log)


def stored_states(root: Path) -> dict[str, tuple[int, str]]:
    """``model/detector`` -> (active version, sha256), each checked against its file."""
    found = {}
    for active in root.glob("*/*/active.json"):
        meta = json.loads(active.read_text())
        data = (active.parent / f"v{meta['version']}.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], active
        found[f"{active.parent.parent.name}/{active.parent.name}"] = (meta["version"], meta["sha256"])
    return found


def leftovers(root: Path) -> list[str]:
    uploads = list((root / ".uploads").glob("*")) if (root / ".uploads").exists() else []
    return [str(p.relative_to(root)) for p in [*uploads, *root.rglob("*.tmp")]]


def knn_state(rows: int) -> bytes:
    """A valid KNN state for the digits model's 64 features, of about ``rows * 256`` bytes."""
    bank = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    return save_detector(KNN(None, k=5, normalize=False).fit_features(bank, torch.zeros(rows, dtype=torch.long)))


@pytest.mark.parametrize("kill_after_bytes", [0, 1 << 20, 6 << 20])
def test_sigkill_during_an_upload_leaves_every_state_valid_after_restart(
    demo_state_dir: Path, tmp_path: Path, kill_after_bytes: int
) -> None:
    states = tmp_path / "states"
    shutil.copytree(demo_state_dir, states)
    state = knn_state(40_000)  # ~10 MiB
    with server_process(states, tmp_path / "server.log") as (url, process):
        assert httpx.put(f"{url}/v1/models/digits/detectors/knn", content=state[:100], headers=AUTH).status_code == 422
        before = stored_states(states)
        parsed = url.removeprefix("http://").split(":")
        sock = socket.create_connection((parsed[0], int(parsed[1])))
        sock.sendall(
            f"PUT /v1/models/digits/detectors/knn HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(state)}\r\n\r\n".encode()
        )
        sock.sendall(state[:kill_after_bytes])
        time.sleep(0.5)  # the server has streamed what it got into its upload file
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        sock.close()
    assert stored_states(states) == before  # the kill came before the commit: the old version is active
    assert leftovers(states), "the killed upload left its file (which start-up must remove)"
    with server_process(states, tmp_path / "server.log") as (url, _):
        assert leftovers(states) == []  # start-up removed the interrupted upload
        answer = httpx.post(f"{url}/v1/models/digits/score?detectors=knn", files=[("files", ("d.png", digit_png(2)))])
        assert answer.status_code == 200 and answer.json()["results"][0]["detectors"]["knn"]["version"] == 1
        assert httpx.put(f"{url}/v1/models/digits/detectors/knn", content=state, headers=AUTH).status_code == 200
    after = stored_states(states)
    assert after["digits/knn"][0] == 2 and after["digits/knn"][1] == hashlib.sha256(state).hexdigest()


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_state_volume_answers_507_and_keeps_the_old_state(demo_state_dir: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "volume", "3m") as volume:
        states = volume / "states"
        shutil.copytree(demo_state_dir, states)
        free = shutil.disk_usage(volume).free
        state = knn_state(max(1000, free // 256 + 4096))  # larger than the free space
        assert len(state) > free
        with server_process(states, tmp_path / "server.log") as (url, _):
            before = stored_states(states)
            answer = httpx.put(f"{url}/v1/models/digits/detectors/knn", content=state, headers=AUTH)
            assert answer.status_code == 507 and answer.headers["content-type"] == "application/problem+json"
            assert "full" in answer.json()["detail"] and str(volume) not in answer.text
            assert stored_states(states) == before and leftovers(states) == []
            scored = httpx.post(
                f"{url}/v1/models/digits/score?detectors=knn", files=[("files", ("d.png", digit_png(1)))]
            )
            assert scored.status_code == 200 and scored.json()["results"][0]["detectors"]["knn"]["version"] == 1
