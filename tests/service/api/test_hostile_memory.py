"""The memory of a real server process under the amplification case of the hostile corpus.

The server runs as a subprocess (``python -m service``) and its resident memory (``/proc/<pid>/status``) is
measured while four 25000 x 1000 images (each within the default 25e6-pixel limit, a few KB on the wire) go to
``/segment``: the answer's maps must stay bounded, so the memory does too, and ``/healthz`` must keep answering
within a second meanwhile.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.api.hostile import SEGMENT, check_maps_bounded
from tests.service.conftest import digit_png, png_bytes, subprocess_server

pytestmark = pytest.mark.timeout(120)

AMPLIFY_SHAPE = (1000, 25_000)  # height, width: 25e6 pixels, exactly the default limit
AMPLIFY_IMAGES = 4
RSS_GROWTH_LIMIT_MB = 300
"""Bound on the server's peak resident-memory growth while it answers the requests. What a bounded server needs:
the images are decoded one at a time, 25 MB each (8-bit gray), plus a transient copy in resizing; submit keeps the
opened (then decoded) images of a body under 64 KB alive until all are decoded: 4 x 25 MB = 100 MB; 64 x 64 maps
are kilobytes; allocator slack some tens of MB: about 150 MB, so 300 MB is twice that. Upsampling the maps to the
images' size instead needs 4 images x 3 detectors x 25e6 float32 = 1.2 GB before any encoding (and ~24 bytes per
pixel again as JSON), far over it."""
RSS_KILL_MB = 1500
"""The watchdog kills the server past this growth: the machine is shared, an unbounded answer may take many GB."""
HEALTH_LIMIT_S = 1.0


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS (``clear_refs`` 5, Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def smooth_png(shape: tuple[int, int], seed: int) -> bytes:
    """A gray image that compresses to a few KB (rows of a repeated ramp), different per seed."""
    height, width = shape
    row = ((np.arange(width) * (seed + 1)) % 256).astype(np.uint8)
    return png_bytes(np.broadcast_to(row, (height, width)).copy())


class Monitor:
    """Samples the server's RSS every 20 ms (killing it past RSS_KILL_MB of growth) and times /healthz."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, baseline_kb: int) -> None:
        self.process, self.url, self.baseline_kb = process, url, baseline_kb
        self.peak_kb = baseline_kb
        self.killed = False
        self.health: list[tuple[float, int | None]] = []  # (seconds, status; None: no answer)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True), threading.Thread(target=self._healthz)]

    def __enter__(self) -> Monitor:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _rss(self) -> None:
        while not self._stop.is_set() and self.process.poll() is None:
            try:
                rss = proc_status_kb(self.process.pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.peak_kb = max(self.peak_kb, rss)
            if rss - self.baseline_kb > RSS_KILL_MB * 1024:
                self.killed = True
                self.process.kill()
                return
            time.sleep(0.02)

    def _healthz(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while not self._stop.is_set() and self.process.poll() is None:
                started = time.monotonic()
                try:
                    status: int | None = http.get("/healthz").status_code
                except httpx.HTTPError:
                    status = None
                self.health.append((time.monotonic() - started, status))
                time.sleep(0.05)


@pytest.fixture
def server_process(demo_state_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m service`` on a free loopback port with a copy of the demo states."""
    states = tmp_path / "states"
    shutil.copytree(demo_state_dir, states)
    with subprocess_server(states, tmp_path / "server.log", OOD_DEVICE="cpu", OOD_LOG_JSON="true") as (url, process):
        yield process, url


def test_segment_amplification_keeps_memory_bounded_and_health_answering(
    server_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = server_process
    images = [("files", (f"wide{i}.png", smooth_png(AMPLIFY_SHAPE, i), "image/png")) for i in range(AMPLIFY_IMAGES)]
    assert sum(len(f[1][1]) for f in images) < 1024 * 1024  # a small request...
    with httpx.Client(base_url=url, timeout=120.0) as http:
        warm = http.post(f"{SEGMENT}?format=json", files=[("files", ("d.png", digit_png(0), "image/png"))])
        assert warm.status_code == 200, warm.text[:500]  # lazy allocations of the route done before the baseline
        baseline_kb = proc_status_kb(process.pid, "VmRSS")
        hwm_reset = reset_peak_rss(process.pid)
        answers: dict[str, httpx.Response | str] = {}
        with Monitor(process, url, baseline_kb) as monitor:
            for fmt in ("json", "png"):
                try:
                    answers[fmt] = http.post(f"{SEGMENT}?format={fmt}", files=images)
                except httpx.HTTPError as error:
                    answers[fmt] = repr(error)
                if monitor.killed:
                    break
        after_kb = proc_status_kb(process.pid, "VmRSS") if process.poll() is None else -1
        peak_kb = monitor.peak_kb
        if hwm_reset and process.poll() is None:
            peak_kb = max(peak_kb, proc_status_kb(process.pid, "VmHWM"))
    growth_mb = (peak_kb - baseline_kb) / 1024
    slowest = max((s for s, _ in monitor.health), default=float("nan"))
    report = (
        f"baseline {baseline_kb / 1024:.0f} MB, peak growth {growth_mb:.0f} MB (VmHWM reset: {hwm_reset}), after "
        f"{after_kb / 1024:.0f} MB; answers {[(k, v if isinstance(v, str) else v.status_code) for k, v in answers.items()]}; "
        f"{len(monitor.health)} /healthz, slowest {slowest:.3f} s"
    )
    print(report)
    assert not monitor.killed, f"killed: RSS grew over {RSS_KILL_MB} MB ({report})"
    assert growth_mb < RSS_GROWTH_LIMIT_MB, report
    for fmt in ("json", "png"):
        answer = answers[fmt]
        assert isinstance(answer, httpx.Response), answer
        check_maps_bounded(answer)
    assert monitor.health, "no /healthz answer was timed"
    slow = [(round(s, 3), status) for s, status in monitor.health if status != 200 or s > HEALTH_LIMIT_S]
    assert not slow, f"/healthz slow or failing while /segment ran: {slow[:5]} of {len(monitor.health)}"
