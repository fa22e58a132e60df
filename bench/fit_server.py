"""Benchmark of a fit job on a running server (issue 10, ``python bench/fit.py server`` or this file): memory of the
server during the job and the scoring latency beside it.

A zip of ``--images`` generated digits (``bench/fit.py``'s :func:`make_zip`: class folders plus 10% ``ood/``) is
fitted by a job (``POST .../fit``, the body streamed from the file) on a real ``python -m service`` process
(demo models, a fresh state directory). Meanwhile ``--concurrency`` virtual users, each with its own
``httpx.AsyncClient``, score one digit per request in a closed loop on the demo classifier. Measured:

* ``idle_rss_mb``: the server's resident memory (``/proc/<pid>/status`` ``VmRSS``) after warm-up, before the job;
  ``peak_rss_mb``: the largest ``VmRSS`` sampled every 50 ms while the job runs (and ``VmHWM`` at the end, the
  kernel's peak since start); target: peak - idle <= 200 MB;
* ``p99_ms`` (and p50, p95, images/s) of the scoring requests with no job, ``--duration`` s before and as long
  after it (``baseline``: both windows pooled, so a change of the machine's load shows in ``baseline_before`` /
  ``baseline_after``), and while the job runs (``during_fit``); target: during / baseline <= 1.5;
* the job's duration, images/s and final state.

Writes ``bench/results/fit-server-<timestamp>.json`` and prints a Markdown table; ``docs/benchmark-fit.md``::

    python bench/fit.py server                       # 20,000 images, concurrency 8
    python bench/fit.py server --images 2000 --duration 3   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
KEY = "bench-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
sys.path.insert(0, str(ROOT))


def make_zip(path: Path, n: int) -> Path:
    spec = importlib.util.spec_from_file_location("bench_fit", ROOT / "bench" / "fit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_zip(path, n)  # type: ignore[no-any-return]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(states: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOD_")}
    env.update(OOD_STATE_DIR=str(states), OOD_API_KEYS=KEY, OOD_STATE_SYNC_S="0", OOD_LOG_LEVEL="WARNING")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in 180 s")


async def user(url: str, png: bytes, stop: asyncio.Event, latencies: list[float], errors: list[int]) -> None:
    """One virtual user: its own client, one request at a time."""
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = await client.post(
                "/v1/models/digits/score?detectors=mahalanobis", files=[("files", ("d.png", png, "image/png"))]
            )
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(response.status_code)


def summary(latencies: list[float], errors: list[int], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else float("nan")

    return {
        "requests": len(ordered),
        "errors": len(errors),
        "images_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


async def load(url: str, png: bytes, concurrency: int, until: Any) -> tuple[list[float], list[int], float]:
    """Closed-loop scoring until ``await until()`` returns; latencies, error statuses, seconds."""
    stop, latencies, errors = asyncio.Event(), [], []  # type: ignore[var-annotated]
    users = [asyncio.create_task(user(url, png, stop, latencies, errors)) for _ in range(concurrency)]
    started = time.perf_counter()
    await until()
    stop.set()
    seconds = time.perf_counter() - started
    await asyncio.gather(*users)
    return latencies, errors, seconds


async def run(args: argparse.Namespace, url: str, pid: int, data: Path) -> dict[str, Any]:
    from tests.service.conftest import digit_png

    png = digit_png(0)
    await load(url, png, args.concurrency, lambda: asyncio.sleep(2.0))  # warm-up
    idle = rss_mb(pid)
    base = await load(url, png, args.concurrency, lambda: asyncio.sleep(args.duration))
    samples: list[float] = []
    job: dict[str, Any] = {}

    async def fit_job() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
            with data.open("rb") as body:
                answer = await client.post(
                    f"/v1/models/digits/detectors/bench/fit?detector_class={args.detector}"
                    f"&batch_size={args.batch_size}",
                    content=body.read() if args.in_memory_body else _chunks(data),
                    headers={**AUTH, "Content-Type": "application/zip"},
                )
            answer.raise_for_status()
            job_id = answer.json()["id"]
            while True:
                samples.append(rss_mb(pid))
                job.update((await client.get(f"/v1/jobs/{job_id}")).json())
                if job["state"] in ("done", "failed", "cancelled"):
                    return
                await asyncio.sleep(0.05)

    during = await load(url, png, args.concurrency, fit_job)
    after = await load(url, png, args.concurrency, lambda: asyncio.sleep(args.duration))
    pooled = (base[0] + after[0], base[1] + after[1], base[2] + after[2])
    result = {
        "images": args.images,
        "concurrency": args.concurrency,
        "detector": args.detector,
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(max(samples, default=idle), 1),
        "hwm_rss_mb": round(rss_mb(pid, "VmHWM"), 1),
        "baseline": summary(*pooled),
        "baseline_before": summary(*base),
        "baseline_after": summary(*after),
        "during_fit": summary(*during),
        "job_state": job.get("state"),
        "job_error": job.get("error"),
        "job_seconds": round(during[2], 2),
        "job_images_per_s": round(job.get("images_done", 0) / during[2], 1),
        "load_average_1m": os.getloadavg()[0],
    }
    result["rss_growth_mb"] = round(result["peak_rss_mb"] - result["idle_rss_mb"], 1)
    result["p99_ratio"] = round(result["during_fit"]["p99_ms"] / result["baseline"]["p99_ms"], 2)
    result["targets_met"] = {
        "rss_growth_le_200mb": result["rss_growth_mb"] <= 200,
        "p99_ratio_le_1_5": result["p99_ratio"] <= 1.5,
    }
    return result


async def _chunks(path: Path, size: int = 1 << 20) -> Any:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def table(r: dict[str, Any]) -> str:
    rows = [
        "| images | idle RSS MB | peak RSS MB (growth) | p99 ms no fit | p99 ms during fit (ratio) | job s "
        "| job img/s |",
        "|---|---|---|---|---|---|---|",
        f"| {r['images']} | {r['idle_rss_mb']} | {r['peak_rss_mb']} ({r['rss_growth_mb']:+}) "
        f"| {r['baseline']['p99_ms']} | {r['during_fit']['p99_ms']} ({r['p99_ratio']}x) | {r['job_seconds']} "
        f"| {r['job_images_per_s']} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of scoring with no fit")
    parser.add_argument("--detector", default="Mahalanobis")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-memory-body", action="store_true", help="send the zip as one bytes body")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ood-fit-server-") as tmp:
        folder = Path(tmp)
        data = make_zip(folder / "data.zip", args.images)
        process, url = start_server(folder / "states", folder / "server.log")
        try:
            result = asyncio.run(run(args, url, process.pid, data))
        finally:
            process.terminate()
            process.wait(30)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.json or RESULTS_DIR / f"fit-server-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(json.dumps(result["targets_met"]), f"-> {out}")


if __name__ == "__main__":
    main()
