"""Checks a running ood-serve container (used by docker/smoke.sh; needs httpx, numpy, pillow, scikit-learn).

1. waits for /readyz; 2. scores a demo digit and checks the answer; 3. checks /metrics;
4. puts the server under concurrent load, sends SIGTERM (docker stop) mid-load, and checks that every request
   that got a response got 200 and that the container exited 0.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

EXPECTED_METRICS = ("ood_http_requests_total", "ood_batch_size_count", "ood_queue_depth", "ood_images_scored_total")


def digit_png(index: int = 0) -> bytes:
    image = load_digits().images[index] / 16.0
    pil = Image.fromarray((image * 255).astype(np.uint8), mode="L").resize((32, 32), Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(client: httpx.Client, timeout_s: float = 240.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if client.get("/readyz").status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"not ready after {timeout_s:.0f}s")


async def load_then_sigterm(url: str, container: str, png: bytes, concurrency: int = 16) -> dict[str, int]:
    statuses: dict[str, int] = {}
    stop_at = time.monotonic() + 30.0
    stopped = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            try:
                r = await client.post("/v1/models/digits/score", files={"files": ("d.png", png, "image/png")})
                key = str(r.status_code)
            except httpx.TransportError:
                key = "refused" if stopped.is_set() else "transport-error-before-stop"
                if stopped.is_set():
                    statuses[key] = statuses.get(key, 0) + 1
                    return
            statuses[key] = statuses.get(key, 0) + 1

    async def terminate() -> None:
        await asyncio.sleep(3.0)
        stopped.set()
        await asyncio.to_thread(
            subprocess.run, ["docker", "stop", "-t", "30", container], check=True, capture_output=True
        )

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        await asyncio.gather(terminate(), *(worker(client) for _ in range(concurrency)))
    return statuses


def main() -> None:
    ap = argparse.ArgumentParser()
    for arg in ("--url", "--container", "--image", "--image-bytes", "--build-seconds", "--out"):
        ap.add_argument(arg, required=True)
    args = ap.parse_args()
    png = digit_png()
    report: dict[str, object] = {
        "image": args.image,
        "image_mib": int(args.image_bytes) // 2**20,
        "build_seconds": int(args.build_seconds),
    }
    with httpx.Client(base_url=args.url, timeout=30.0) as client:
        report["ready_seconds"] = round(wait_ready(client), 1)
        r = client.post("/v1/models/digits/score", files={"files": ("d.png", png, "image/png")})
        r.raise_for_status()
        result = r.json()["results"][0]
        assert result["prediction"]["label"] is not None and result["detectors"], result
        report["score_response"] = result
        metrics = client.get("/metrics").text
        missing = [m for m in EXPECTED_METRICS if m not in metrics]
        assert not missing, f"/metrics lacks {missing}"
    statuses = asyncio.run(load_then_sigterm(args.url, args.container, png))
    report["statuses_during_sigterm"] = statuses
    exit_code = int(
        subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", args.container],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    report["exit_code"] = exit_code
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    bad = {k: v for k, v in statuses.items() if k not in ("200", "refused")}
    if bad or exit_code != 0 or statuses.get("200", 0) == 0:
        sys.exit(f"FAILED: statuses {statuses}, exit code {exit_code}")
    print("docker smoke: OK")


if __name__ == "__main__":
    main()
