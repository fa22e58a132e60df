"""A large state upload streams to the state volume and loads from there: the server's peak memory grows by
about the loaded tensors, not by several copies of the body (it was 8x the upload before)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from ood_core.detector import KNN
from ood_core.state import save_detector
from tests.service.conftest import AUTH, digit_png, subprocess_server

pytestmark = pytest.mark.timeout(180)
BANK_ROWS = 800_000  # x 64 float32 features of the digits model: ~195 MiB


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def server(demo_state_dir: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    states = tmp_path / "states"
    shutil.copytree(demo_state_dir, states)
    with subprocess_server(states, tmp_path / "server.log") as (url, process):
        yield url, process, states


def test_peak_memory_of_a_large_upload_is_about_its_tensors(
    server: tuple[str, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    url, process, states = server
    bank = torch.randn(BANK_ROWS, 64, generator=torch.Generator().manual_seed(0))
    # normalize=False: the exact search keeps no bfloat16 copy of the bank (on CPUs with bfloat16 dot products the
    # default keeps one, +0.5x, which is the detector's serving memory and not the upload's)
    detector = KNN(None, k=5, normalize=False).fit_features(bank, torch.zeros(BANK_ROWS, dtype=torch.long))
    state = tmp_path / "knn.safetensors"
    save_detector(detector, state)
    del bank, detector
    size_kib = state.stat().st_size / 1024
    try:
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError as exc:
        pytest.skip(f"cannot reset the server's peak RSS: {exc}")
    time.sleep(0.2)
    before = status_kib(process.pid, "VmRSS")

    def body() -> Iterator[bytes]:  # streamed: the client does not hold the file either
        with state.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    headers = {**AUTH, "Content-Type": "application/octet-stream", "Content-Length": str(state.stat().st_size)}
    answer = httpx.put(f"{url}/v1/models/digits/detectors/big-knn", content=body(), headers=headers, timeout=120)
    assert answer.status_code == 201, answer.text
    peak = status_kib(process.pid, "VmHWM")
    growth = (peak - before) / size_kib
    print(f"upload of {size_kib / 1024:.0f} MiB: server peak RSS +{(peak - before) / 1024:.0f} MiB = {growth:.2f}x")
    # the detector keeps its bank (1x); streaming + loading from the file may add chunks and page-cache noise
    assert growth < 1.5, f"peak RSS grew by {growth:.2f}x the upload ({size_kib / 1024:.0f} MiB)"
    assert list((states / ".uploads").iterdir()) == []  # the upload file became the version file
    scored = httpx.post(f"{url}/v1/models/digits/score?detectors=big-knn", files=[("files", ("d.png", digit_png(3)))])
    assert scored.status_code == 200 and scored.json()["results"][0]["detectors"]["big-knn"]["version"] == 1
    listed = httpx.get(f"{url}/v1/models/digits/detectors").json()["detectors"]
    assert any(d["name"] == "big-knn" and d["size_bytes"] == state.stat().st_size for d in listed)
