"""A 30 s soak of a real server process: ``bench/soak.py --seconds 30 --concurrency 32`` (mixed routes over HTTP
against a ``python -m service`` subprocess, one client per virtual user, closed loop), run as a subprocess.

Asserted from its JSON result: every request got a designed answer (its success status, or 429 / 503 / 504) and no
request raised; the server stayed up; open file descriptors and threads were flat after the warm-up (max - min
within ``bench/soak.py``'s defaults: 8 fds, 16 threads; see its docstring).

Memory: the script's own criterion (under 5% RSS growth between the first and the last minute after a 20% warm-up)
is meant for runs of minutes. In 30 s the windows are a few seconds long, right after start-up, while the
allocator, torch and the caches are still settling, so a 5% bound would be noise either way. What this test asserts
is honest for its length: after a 10 s warm-up (``--warmup-share 0.33``), the median RSS of the last window is under
15% above that of the first one (their middles are about 13 s apart), which catches a leak of roughly 13 MB/s or
more (15% of the server's ~1.1 GB) and nothing finer. ``docs/reliability.md`` has the 5-minute figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 30
CONCURRENCY = 32
WARMUP_SHARE = 0.33  # 10 s of 30
MAX_RSS_GROWTH_PCT = 15.0


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "soak.py"),
        "--seconds",
        str(SECONDS),
        "--concurrency",
        str(CONCURRENCY),
        "--warmup-share",
        str(WARMUP_SHARE),
        "--max-rss-growth-pct",
        str(MAX_RSS_GROWTH_PCT),
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200)
    print(completed.stdout[-6000:])
    print(completed.stderr[-4000:], file=sys.stderr)
    assert out.exists(), f"bench/soak.py wrote no result (exit {completed.returncode})"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_every_answer_is_designed(soak: dict[str, Any]) -> None:
    assert soak["meta"]["requests"] > 0
    routes = soak["routes"]
    assert {"score", "segment?format=png", "segment?format=npy", "segment?format=json"} <= set(routes)
    assert all(info["undesigned"] == 0 for info in routes.values()), soak["error_samples"]
    assert all("exception" not in info["statuses"] for info in routes.values()), soak["error_samples"]
    assert soak["verdict"]["server_alive"]


def test_fds_and_threads_are_flat(soak: dict[str, Any]) -> None:
    verdict = soak["verdict"]
    flat = [f for f in verdict["failures"] if f.startswith(("fds", "threads"))]
    assert not flat, (flat, verdict)


def test_rss_growth_is_bounded(soak: dict[str, Any]) -> None:
    verdict = soak["verdict"]
    assert verdict["rss_growth_pct"] < MAX_RSS_GROWTH_PCT, verdict
