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
table. Method and results: ``docs/benchmark-serve.md``. The load generator is ``bench/serve_load.py``, the servers,
scenarios and in-process limit ``bench/serve_servers.py``. Usage::

    python bench/serve.py                       # both scenarios, concurrency 1 8 64, >= 3 x 2 s per cell
    python bench/serve.py --scenarios demo --duration 3 --concurrency 1 64
    git worktree add /tmp/base HEAD~1 && python bench/serve.py --scenarios demo --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from serve_load import Cell, LoadSpec, Slices, inprocess_load, load_in_processes, noise_png
from serve_servers import (
    RESULTS_DIR,
    SCENARIOS,
    InProcess,
    Server,
    config_scenario,
    resnet18_config,
    start_servers,
    torch_threads,
)


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
