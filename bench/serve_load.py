"""The closed-loop load generator of ``bench/serve.py`` and what it measures: one httpx client per virtual user,
latencies, completions, the server's batch-size histogram and CPU time from ``/proc``, split over processes."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BATCH_SIZE_METRIC = "ood_batch_size"  # histogram family of service/metrics.py (images per model forward)


@dataclass
class Cell:
    scenario: str
    mode: str
    concurrency: int
    duration_s: float
    images: int
    errors: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float | None
    counted_images_per_s: float = 0.0
    """Completions inside the measured windows / their length (quantized by batch completions)."""
    images_per_request: int = 1
    load_average_1m: float = 0.0
    """1-minute load average of the machine right after the cell (the machine is shared: read the numbers with it)"""
    server_cpu_ms_per_image: float | None = None
    """CPU time (all threads, user + system) the server process spent per image in the measured windows; (c): the
    benchmark process's CPU per image. Unlike throughput it barely depends on foreign load: when the cores are
    saturated, throughput ~ cores / (server + client CPU per image)."""
    client_cpu_ms_per_image: float | None = None
    """CPU time of the load generator (this process) per image in the measured windows."""


@dataclass
class Slices:
    """Measurements of one cell, summed over its interleaved slices."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    images: int = 0
    elapsed: float = 0.0
    batch_sum: float = 0.0
    batch_count: float = 0.0
    outstanding_images: int = 0
    """Images always in flight in a closed loop (clients x images per request); 0 for the in-process loop."""
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    def add(self, other: Slices) -> None:
        self.outstanding_images = other.outstanding_images
        self.latencies += other.latencies
        self.errors += other.errors
        self.images += other.images
        self.elapsed += other.elapsed
        self.batch_sum += other.batch_sum
        self.batch_count += other.batch_count
        self.server_cpu_s += other.server_cpu_s
        self.client_cpu_s += other.client_cpu_s

    def cell(self, scenario: str, mode: str, concurrency: int) -> Cell:
        """Throughput of an HTTP cell by Little's law, ``X = images in flight / mean latency``: in a closed loop it
        is exact, and unlike counting completions in a short window it is not quantized by batches that complete
        32 images at once (resnet18 at concurrency 64 completes one batch every ~1.5 s)."""
        ordered = sorted(self.latencies)
        counted = self.images / self.elapsed if self.elapsed > 0 else 0.0
        mean_latency = sum(ordered) / len(ordered) if ordered else 0.0
        little = self.outstanding_images / mean_latency if self.outstanding_images and mean_latency > 0 else counted
        return Cell(
            scenario=scenario,
            mode=mode,
            concurrency=concurrency,
            duration_s=round(self.elapsed, 3),
            images=self.images,
            errors=self.errors,
            images_per_s=round(little, 2),
            counted_images_per_s=round(counted, 2),
            p50_ms=round(1000 * percentile(ordered, 50), 2),
            p95_ms=round(1000 * percentile(ordered, 95), 2),
            p99_ms=round(1000 * percentile(ordered, 99), 2),
            mean_batch_size=round(self.batch_sum / self.batch_count, 2) if self.batch_count > 0 else None,
            load_average_1m=round(os.getloadavg()[0], 2),
            server_cpu_ms_per_image=per_image_ms(self.server_cpu_s, self.images),
            client_cpu_ms_per_image=per_image_ms(self.client_cpu_s, self.images) if self.outstanding_images else None,
        )


def per_image_ms(seconds: float, images: int) -> float | None:
    return round(1000 * seconds / images, 3) if images and seconds > 0 else None


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants (all threads; Linux ``/proc``: the
    LitServe peer and ``OOD_WORKERS`` run several processes), or of this process."""
    if pid is None:
        return time.process_time()
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        pending += [int(c) for c in children]
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def batch_size_totals(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram over all label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    total, count = 0.0, 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != BATCH_SIZE_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


async def http_load(
    url: str,
    path: str,
    image: bytes,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    images_per_request: int,
    server_pid: int | None = None,
    metrics: bool = True,
) -> Slices:
    """One closed-loop slice: ``concurrency`` clients POST ``path`` for ``warmup_s + duration_s`` without pause;
    only requests that COMPLETE inside the last ``duration_s`` count (so neither the ramp-up nor the drain at the
    end biases the throughput); ``/metrics`` (``metrics``: the service's) is scraped at both ends of that window.

    Each virtual client has its own ``httpx.AsyncClient`` with one keep-alive connection: one shared pool of 64
    connections cost httpx ~10 ms of CPU per request (its pool bookkeeping grows with the pool), which made the
    load generator, not the server, the bottleneck."""
    result = Slices(elapsed=duration_s, outstanding_images=concurrency * images_per_request)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) for _ in range(concurrency + 1)]
    window_start = time.monotonic() + warmup_s  # after creating the clients (~10 ms each: an SSL context)
    window_end = window_start + duration_s
    files = [("files", (f"image{i}.png", image, "image/png")) for i in range(images_per_request)]

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < window_end:
            began = time.monotonic()
            try:
                response = await client.post(path, files=files)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            done = time.monotonic()
            if window_start <= done <= window_end:
                if ok:
                    result.latencies.append(done - began)
                    result.images += images_per_request
                else:
                    result.errors += 1

    async def scrape_at(moment: float, scraper: httpx.AsyncClient) -> tuple[float, float, float, float]:
        await asyncio.sleep(max(0.0, moment - time.monotonic()))
        cpu = (process_cpu_s(server_pid) if server_pid is not None else 0.0), process_cpu_s()
        batches = batch_size_totals((await scraper.get("/metrics")).text) if metrics else (0.0, 0.0)
        return (*batches, *cpu)

    async def scrape_window(scraper: httpx.AsyncClient) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return await scrape_at(window_start, scraper), await scrape_at(window_end, scraper)

    try:
        scraper = asyncio.create_task(scrape_window(clients[-1]))
        await asyncio.gather(*(client_loop(c) for c in clients[:-1]))
        before, after = await scraper
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    result.batch_sum, result.batch_count = after[0] - before[0], after[1] - before[1]
    result.server_cpu_s, result.client_cpu_s = after[2] - before[2], after[3] - before[3]
    return result


@dataclass
class LoadSpec:
    """The arguments of :func:`http_load` (picklable, for load generators in several processes)."""

    url: str
    path: str
    image: bytes
    concurrency: int
    duration_s: float
    warmup_s: float
    images_per_request: int
    server_pid: int | None
    metrics: bool


def _load_part(spec: LoadSpec, share: int, scrape: bool) -> Slices:
    import dataclasses

    part = dataclasses.replace(spec, concurrency=share, metrics=spec.metrics and scrape)
    if not scrape:
        part.server_pid = None
    return asyncio.run(http_load(**dataclasses.asdict(part)))


def load_in_processes(spec: LoadSpec, processes: int) -> Slices:
    """:func:`http_load` of ``spec``, its virtual users split over ``processes`` load-generator processes (one
    asyncio client process tops out near 1000 requests/s: enough for a CPU box, not for a GPU). The first
    process scrapes the server; client CPU is summed over all of them."""
    processes = max(1, min(processes, spec.concurrency))
    if processes == 1:
        return _load_part(spec, spec.concurrency, True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [spec.concurrency // processes + (i < spec.concurrency % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_load_part, [spec] * processes, shares, [i == 0 for i in range(processes)]))
    total = parts[0]
    for part in parts[1:]:
        total.latencies += part.latencies
        total.errors += part.errors
        total.images += part.images
        total.client_cpu_s += part.client_cpu_s
    total.outstanding_images = spec.concurrency * spec.images_per_request
    return total


def noise_png(size: tuple[int, int], channels: int) -> bytes:
    """A random image of the model's input size, PNG-encoded (the service decodes and preprocesses it)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size[0], size[1]) if channels == 1 else (size[0], size[1], 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_for(info: dict[str, Any]) -> bytes:
    size = info.get("input_size") or [224, 224]
    height, width = (size[-2], size[-1]) if isinstance(size, list) else (size, size)
    channels = size[0] if isinstance(size, list) and len(size) == 3 else 3
    return noise_png((int(height), int(width)), int(channels))


def inprocess_load(
    score_batch: Callable[[int], object],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_batch_size: int,
    images_per_request: int = 1,
) -> Slices:
    """Call the scoring path on batches of ``min(waiting images, max_batch_size)`` back to back (no HTTP, no
    queue): the throughput limit. Latency is modelled as a closed loop with perfect batching: a request waits
    ``ceil(waiting images / batch)`` batch times."""
    waiting = concurrency * images_per_request
    size = min(waiting, max_batch_size)
    rounds = math.ceil(waiting / size)
    stop_at = time.monotonic() + warmup_s
    while time.monotonic() < stop_at:
        score_batch(size)
    result = Slices()
    began, cpu_began = time.monotonic(), process_cpu_s()
    while time.monotonic() < began + duration_s:
        start = time.monotonic()
        score_batch(size)
        result.latencies += [rounds * (time.monotonic() - start)] * max(1, size // images_per_request)
        result.images += size
        result.batch_sum += size
        result.batch_count += 1
    result.elapsed = time.monotonic() - began
    result.server_cpu_s = process_cpu_s() - cpu_began
    return result
