"""Closed-loop load benchmark of the scoring service: dynamic batching vs. no batching vs. in-process.

For each model scenario (``demo``: the embedded digits classifier; ``resnet18``: torchvision resnet18 with random
weights at 224x224, saved as safetensors into a temp dir and configured through the service's config file) and
each concurrency level, ``N`` asyncio clients each send one request, wait for the answer and send the next
(closed loop) against a real ``python -m service`` uvicorn process on a free loopback port:

* (a) ``batched``: ``OOD_MAX_BATCH_SIZE=32``, ``OOD_MAX_WAIT_MS=0`` (the defaults: adaptive batching);
* (b) ``unbatched``: ``OOD_MAX_BATCH_SIZE=1``;
* (c) ``inprocess``: the same model and detector states loaded in this process through the service's own code and
  called with no HTTP and no queue, on batches of ``min(images in flight, 32)`` in one worker thread (the limit
  the service can approach).

Reported per cell: throughput (images/s), latency p50/p95/p99 (ms), the mean batch size read from the
service's ``/metrics`` batch-size histogram (``_sum / _count`` over the measured window), and the CPU time per image
of the server process and of the load generator (Linux ``/proc``; less sensitive to foreign load than throughput).
``--baseline DIR`` also runs (a) and (b) from another source tree in the same interleaved rounds, for before/after
comparisons. The machine may be shared:
all servers run side by side and each cell is measured in ``--rounds`` interleaved slices (a, b, c, b, c, a, c, a,
b, ...: each mode goes first in turn, since the first slice of a round measured systematically slower; use a
multiple of the number of modes), so a burst of foreign load hits all modes alike and their RATIOS stay meaningful; the 1-minute load average
is recorded with every cell. Warm-up and window grow with the closed-loop cycle, and throughput is taken by Little's
law (see :meth:`Slices.cell`). Writes JSON to ``bench/results/serve-<timestamp>.json`` and prints a Markdown
table. Method and results: ``docs/benchmark-serve.md``. Usage::

    python bench/serve.py                       # both scenarios, concurrency 1 8 64, >= 3 x 2 s per cell
    python bench/serve.py --scenarios demo --duration 3 --concurrency 1 64
    git worktree add /tmp/base HEAD~1 && python bench/serve.py --scenarios demo --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
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


# ---------------------------------------------------------------------------------------------- server process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server in a subprocess on a free loopback port (its own process group); waits until it is ready.

    ``kind="service"``: ``python -m service`` from ``source`` (another checkout for ``--baseline``), ready at
    ``/readyz``, scored at ``/v1/models/{model}/score``, stopped with SIGTERM. ``kind="litserve"``: the LitServe
    peer (``bench/litserve_peer.py``, ``args`` its options), ready at ``/health``, scored at ``/predict``, stopped
    with SIGINT (it ignores SIGTERM). ``prefix``: a launcher to run the service under (``py-spy record ... --``),
    whose child is then the server."""

    def __init__(
        self,
        env: dict[str, str],
        config: Path | None,
        log_path: Path,
        source: Path = ROOT,
        prefix: list[str] | None = None,
        kind: str = "service",
        args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kind = kind
        self.wrapped = bool(prefix)
        if kind == "litserve":
            command = [sys.executable, str(ROOT / "bench" / "litserve_peer.py"), "--port", str(self.port)]
            command += args or []
        else:
            command = [
                *(prefix or []),
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        if config is not None:
            command += ["--config", str(config)]
        self.ready_path = "/health" if kind == "litserve" else "/readyz"
        self.log = log_path.open("wb")
        path = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            command,
            cwd=source,
            env={**os.environ, **env, "PYTHONPATH": path},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def score_path(self, model: str, detectors: list[str] | None) -> str:
        if self.kind == "litserve":
            return "/predict"
        return f"/v1/models/{model}/score" + (f"?detectors={','.join(detectors)}" if detectors else "")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s} s; log: {self.log.name}")

    def pause(self) -> None:
        """SIGSTOP its process group: an idle server costs nothing while another is measured (LitServe's idle
        workers poll, about one core)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop_after_ready(self) -> None:
        try:
            self.wait_ready()
        finally:
            self.stop()

    def server_pid(self) -> int:
        """The server's pid (the launcher's child when ``prefix`` was given)."""
        if not self.wrapped:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0]) if children else self.process.pid

    def stop(self) -> None:
        if self.wrapped and self.process.poll() is None:  # stop the server; the launcher exits after it
            os.kill(self.server_pid(), signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(60)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if self.kind == "litserve" else signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group: the server and its workers
                self.process.wait()
        self.log.close()


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


# ---------------------------------------------------------------------------------------------- HTTP load
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


# ---------------------------------------------------------------------------------------------- in-process limit
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


# ---------------------------------------------------------------------------------------------- scenarios
SCENARIOS = {"demo": None, "resnet18": 224, "resnet18-64": 64, "config": None}
"""Scenario -> input size of the torchvision resnet18 (``None``: the embedded digits demo; ``config``: the model
of ``--config``)."""


def config_scenario(source: Path, workdir: Path, state_dir: Path) -> Path:
    """``--config``'s file with the state directory replaced by the benchmark's (a JSON copy in ``workdir``)."""
    from service.settings import read_config_file

    values = read_config_file(source)
    values["state_dir"] = str(state_dir)
    path = workdir / "config.json"
    path.write_text(json.dumps(values, indent=2, default=str))
    return path


def resnet18_config(workdir: Path, state_dir: Path, size: int = 224) -> Path:
    """Random-weight resnet18 (10 classes) saved as safetensors, plus a service config file serving it at
    ``size`` x ``size``."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=10).eval()
    weights = workdir / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    config = {
        "state_dir": str(state_dir),
        "models": [
            {
                "name": "resnet18",
                "source": "torchvision",
                "architecture": "resnet18",
                "weights": str(weights),
                "num_classes": 10,
                "input_size": [size, size],
                "preprocessing": {"mode": "RGB"},
                "nodes": {"logits": "fc", "features": "flatten", "feature_maps": "layer4"},
                "heads": {"features": ["fc"]},
            }
        ],
    }
    path = workdir / f"resnet18-{size}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


class InProcess:
    """The served model and its active detectors loaded in this process through the service's own code (same
    config, same state directory, same decode + preprocessing + forward + detectors), minus HTTP and the queue."""

    def __init__(self, config: Path | None, state_dir: Path) -> None:
        from service.demo import demo_model_configs
        from service.engine.served_model import ServedModel
        from service.settings import load_settings
        from service.states.manager import StateManager

        self.settings = load_settings(config, state_dir=state_dir)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inprocess")
        configs = self.settings.models or demo_model_configs()
        self.model = ServedModel(next(c for c in configs if c.task == "classification"), self.settings)
        StateManager(state_dir).load_stored(self.model)

    def install_energy_state(self, images: int = 64) -> None:
        """Calibrate an EnergyBased detector on random images and store it (for the random-weight resnet18)."""
        import torch

        from service.states.fitting import fit_state
        from service.states.store import StateStore

        pixels = list(torch.randint(0, 256, (images, 3, *self.model.config.input_size), dtype=torch.uint8))
        outputs = self.model.forward_chunks(pixels, chunk=32)
        data = fit_state(self.model, "EnergyBased", {}, outputs, None, outputs)
        StateStore(self.settings.state_dir).put(self.model.name, "energy", data, "EnergyBased")

    def batch_scorer(
        self, image: bytes, names: list[str] | None = None, predecoded: bool = False
    ) -> Callable[[int], object]:
        """``score_batch(n)``: decode ``image`` n times and score the batch (``names``: the detectors; all).
        ``predecoded``: decode it once and score the same pixels (the model's own limit: on a GPU box the service
        decodes on many cores while this loop would decode on one)."""
        from service.engine.decode import RawImage, decode_image
        from service.engine.items import ScoreItem
        from service.engine.scoring import process_batch

        model, max_pixels = self.model, self.settings.max_pixels
        detectors = tuple(model.detectors[name] for name in (names or sorted(model.detectors)))

        decoded = model.preprocessor.pixels(decode_image(RawImage(image, "bench"), max_pixels))

        def score_batch(size: int) -> object:
            if predecoded:
                pixels = [decoded] * size
            else:
                pixels = [
                    model.preprocessor.pixels(decode_image(RawImage(image, "bench"), max_pixels)) for _ in range(size)
                ]
            return process_batch(model, [ScoreItem(p, detectors) for p in pixels])

        return score_batch


def start_servers(
    scenario: str, args: argparse.Namespace, workdir: Path, config: Path | None, state_dir: Path
) -> dict[str, Server]:
    """Every HTTP mode's server, started one after the other (the first start fits the demo states once)."""
    servers: dict[str, Server] = {}
    sources = [("", ROOT, args.max_wait_ms)]
    if args.baseline:
        sources.append(("-baseline", args.baseline.resolve(), args.baseline_wait_ms))
    for suffix, source, wait_ms in sources:
        # each source tree its own state directory: an older tree may not read the state files a newer one
        # writes (and would then serve no detectors, doing less work per image)
        states = state_dir if not suffix else state_dir.with_name(state_dir.name + suffix)
        if suffix and config is not None and not states.exists():
            shutil.copytree(state_dir, states)
            for active in states.rglob("active.json"):  # trees before the version history read no "history"
                record = json.loads(active.read_text())
                record.pop("history", None)
                active.write_text(json.dumps(record))
        for mode, batch_size in (("batched", args.max_batch_size), ("unbatched", 1)):
            if mode not in args.modes:
                continue
            env = {
                "OOD_MAX_BATCH_SIZE": str(batch_size),
                "OOD_MAX_WAIT_MS": str(wait_ms),
                "OOD_STATE_DIR": str(states),
                "OOD_LOG_LEVEL": "WARNING",
                **dict(item.split("=", 1) for item in args.server_env),
            }
            name = mode + suffix
            servers[name] = Server(env, config, workdir / f"{scenario}-{name}.log", source)
            servers[name].wait_ready()
            servers[name].pause()
    if "litserve" in args.modes:
        peer_args = ["--state-dir", str(state_dir), "--max-batch-size", str(args.max_batch_size)]
        peer_args += ["--max-wait-ms", str(args.max_wait_ms)]
        if args.detectors:
            peer_args += ["--detectors", *args.detectors]
        env = dict(item.split("=", 1) for item in args.server_env)
        servers["litserve"] = Server(env, config, workdir / f"{scenario}-litserve.log", kind="litserve", args=peer_args)
        servers["litserve"].wait_ready()
        servers["litserve"].pause()
    return servers


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def run_scenario(scenario: str, args: argparse.Namespace, workdir: Path) -> list[Cell]:
    state_dir = workdir / f"states-{scenario}"
    size = SCENARIOS[scenario]
    config = resnet18_config(workdir, state_dir, size) if size is not None else None
    if scenario == "config":
        if args.config is None:
            raise SystemExit("the config scenario needs --config FILE")
        config = config_scenario(args.config, workdir, state_dir)
    if config is not None:  # the servers load this state at start-up, like any stored state
        InProcess(config, state_dir).install_energy_state()
    if config is None:  # the demo's states are fitted by a service's first start: by a throwaway one, so that
        # every measured server starts the same way (a server that fitted them served ~10% slower at concurrency 1)
        Server({"OOD_STATE_DIR": str(state_dir)}, None, workdir / f"{scenario}-fit.log").stop_after_ready()
    servers: dict[str, Server] = {}
    try:
        servers = start_servers(scenario, args, workdir, config, state_dir)
        for server in servers.values():
            server.pause()
        inprocess = InProcess(config, state_dir)
        model = inprocess.model
        print(f"# {scenario}: model {model.name}, detectors {args.detectors or sorted(model.detectors)}", flush=True)
        for name, server in servers.items():
            if server.kind != "service":
                continue
            server.resume()
            models = httpx.get(f"{server.url}/v1/models", timeout=10.0).json()["models"]
            served = next(m for m in models if m["name"] == model.name)
            if sorted(served["detectors"]) != sorted(model.detectors):
                print(f"# WARNING: {name} serves detectors {served['detectors']}: its numbers are not comparable")
            server.pause()
        height, width = model.config.input_size
        image = noise_png((height, width), model.preprocessor.channels)
        score_batch = inprocess.batch_scorer(image, args.detectors, args.inprocess_predecoded)
        if "inprocess" in args.modes and inprocess.model.device.type == "cpu":  # the service's own thread plan
            from service.engine.threads import batch_sizes, plan_threads

            plan = inprocess.worker.submit(
                plan_threads, score_batch, batch_sizes(args.max_batch_size), torch_threads()
            ).result()
            inprocess.model.thread_plan = plan  # process_batch applies it per batch, as in the service
            print(f"# in-process worker threads from batch size: {plan.describe()}", flush=True)
        modes = [*servers, *(["inprocess"] if "inprocess" in args.modes else [])]
        cells = []
        for concurrency in args.concurrency:
            waiting = concurrency * args.images_per_request
            size_now = min(waiting, args.max_batch_size)
            began = time.monotonic()
            inprocess.worker.submit(score_batch, size_now).result()
            cycle = math.ceil(waiting / size_now) * (time.monotonic() - began)  # ideal closed-loop latency
            slice_s = max(args.duration / args.rounds, 2 * cycle)  # every client completes >= ~2 requests
            warmup_s = max(args.warmup, 1.5 * cycle)  # queues reach steady state before measuring
            totals = {mode: Slices() for mode in modes}
            for round_index in range(args.rounds):  # interleaved: a burst of foreign load hits every mode alike
                shift = round_index % len(modes)  # and each mode goes first in turn: no position bias
                for mode in modes[shift:] + modes[:shift]:
                    if mode == "inprocess":  # in one worker thread, like the service's batcher
                        totals[mode].add(
                            inprocess.worker.submit(
                                inprocess_load,
                                score_batch,
                                concurrency,
                                slice_s,
                                args.warmup,
                                args.max_batch_size,
                                args.images_per_request,
                            ).result()
                        )
                        continue
                    server = servers[mode]
                    server.resume()
                    load = LoadSpec(
                        server.url,
                        server.score_path(model.name, args.detectors),
                        image,
                        concurrency,
                        slice_s,
                        warmup_s,
                        args.images_per_request,
                        server.process.pid,
                        server.kind == "service",
                    )
                    try:
                        totals[mode].add(load_in_processes(load, args.client_processes))
                    finally:
                        server.pause()
            for mode, total in totals.items():
                cells.append(total.cell(scenario, mode, concurrency))
                cells[-1].images_per_request = args.images_per_request
                print(json.dumps(asdict(cells[-1])), flush=True)
        return cells
    finally:
        for server in servers.values():
            server.resume()
            server.stop()


def markdown(cells: list[Cell]) -> str:
    lines = [
        "| scenario | mode | concurrency | images/s | p50 ms | p95 ms | p99 ms | mean batch | server CPU ms/img "
        "| client CPU ms/img | errors | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    for c in cells:
        lines.append(
            f"| {c.scenario} | {c.mode} | {c.concurrency} | {c.images_per_s:.1f} | {c.p50_ms:.1f} | {c.p95_ms:.1f} "
            f"| {c.p99_ms:.1f} | {fmt(c.mean_batch_size, 1)} | {fmt(c.server_cpu_ms_per_image, 2)} "
            f"| {fmt(c.client_cpu_ms_per_image, 2)} | {c.errors} | {c.load_average_1m:.1f} |"
        )
    by_key = {(c.scenario, c.mode, c.concurrency): c for c in cells}
    lines.append("")
    for scenario, _, concurrency in sorted({(c.scenario, "", c.concurrency) for c in cells}):
        ratios = []
        for numerator, denominator, label in RATIOS:
            top, bottom = (
                by_key.get((scenario, numerator, concurrency)),
                by_key.get((scenario, denominator, concurrency)),
            )
            if top and bottom and bottom.images_per_s > 0:
                text = f"{label} = {top.images_per_s / bottom.images_per_s:.2f}x"
                if denominator == "litserve":
                    text += f" (p99 {top.p99_ms:.1f} vs {bottom.p99_ms:.1f} ms)"
                ratios.append(text)
        lines.append(f"- {scenario} @ {concurrency}: " + ", ".join(ratios))
    return "\n".join(lines)


RATIOS = [
    ("batched", "unbatched", "batched/unbatched"),
    ("batched", "batched-baseline", "batched/baseline batched"),
    ("batched", "litserve", "batched/litserve"),
    ("batched", "inprocess", "batched/in-process"),
    ("litserve", "inprocess", "litserve/in-process"),
    ("batched-baseline", "unbatched-baseline", "baseline: batched/unbatched"),
    ("batched-baseline", "inprocess", "baseline: batched/in-process"),
]
"""Throughput ratios printed per scenario and concurrency (numerator mode, denominator mode, label)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["demo", "resnet18-64", "resnet18"], choices=SCENARIOS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell (all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved slices per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each slice")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="batched mode (and LitServe's batch_timeout)")
    parser.add_argument("--baseline-wait-ms", type=float, default=5.0, help="the baseline tree's batched mode")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["batched", "unbatched", "inprocess"],
        choices=["batched", "unbatched", "inprocess", "litserve"],
        help="litserve: the same model and detectors served by LitServe (bench/litserve_peer.py; needs "
        "`pip install --target build/litserve --no-deps litserve==0.2.19 pyzmq`)",
    )
    parser.add_argument("--detectors", nargs="+", default=None, help="detectors to score (default: all active)")
    parser.add_argument("--server-env", nargs="*", default=[], help="extra NAME=VALUE for every server")
    parser.add_argument("--config", type=Path, default=None, help="a service config file (scenario `config`)")
    parser.add_argument("--client-processes", type=int, default=1, help="load-generator processes")
    parser.add_argument(
        "--inprocess-predecoded", action="store_true", help="in-process mode: decode the image once (model limit)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/serve-*.json)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another source tree (e.g. `git worktree add /tmp/base HEAD~1`): its service runs as modes "
        "batched-baseline / unbatched-baseline, interleaved in the same rounds (before/after comparisons)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for the servers and this process ('' = leave unset); see docs/benchmark-serve.md",
    )
    args = parser.parse_args(argv)
    if args.omp_wait_policy:  # must be set before torch (libgomp) is loaded: torch is imported lazily below
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    cells: list[Cell] = []
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="ood-bench-serve-") as tmp:
        for scenario in args.scenarios:
            cells += run_scenario(scenario, args, Path(tmp))
    out = args.out or RESULTS_DIR / f"serve-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpu_count": os.cpu_count(),
        "argv": sys.argv[1:],
        "python": sys.version.split()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "baseline": str(args.baseline) if args.baseline else None,
        "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
    }
    out.write_text(json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=2))
    print(markdown(cells))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
