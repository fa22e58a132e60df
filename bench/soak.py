"""Soak test of the scoring service: N minutes of mixed closed-loop traffic over real HTTP, watching for errors and
for leaks (memory, file descriptors, threads) of the server process.

A ``python -m service`` subprocess (the embedded digits demo, a temporary state directory, an API key set, logs at
WARNING into the temporary directory) runs on a free 127.0.0.1 port. ``--concurrency`` virtual users, each with
its own ``httpx.AsyncClient`` and one keep-alive connection (as in ``bench/serve.py``), send one request, wait
for the answer and send the next, for ``--minutes`` / ``--seconds``. Each user draws its requests from a seeded
mix (:data:`MIX`): mostly ``/score`` with 1-4 images (multipart or JSON base64), some ``/segment`` in each map
format (png, npy, json), the model and detector lists, ``/metrics``, ``/healthz``, occasional state downloads and
at most one upload every :data:`UPLOAD_INTERVAL_S` s (a downloaded state of the classifier under the separate name
``soak-upload``, with the key; from the first upload on, score requests, which use every active detector, include
it). Answers are checked lightly (status, number of results).

Recorded: per route, counts by status; every *undesigned* outcome (anything but the route's success statuses and
the designed overload answers 429 / 503 / 504, any exception, a 200 with the wrong number of results), with the
first few kept as samples; latency p50/p95/p99 of the requests sent after the warm-up; and, every second, the
server's RSS (``VmRSS``), open file descriptors (``/proc/<pid>/fd``) and threads (``Threads`` of
``/proc/<pid>/status``).

Verdict, over the samples after the warm-up (the first ``--warmup-share`` of the run, 20%): RSS growth = median of
the last window vs median of the first window after the warm-up (window: 60 s, or a third of the post-warm-up time
when shorter), which must stay under ``--max-rss-growth-pct`` (5%); fds and threads are *flat* when their
max - min after the warm-up is at most ``--max-fd-spread`` (8: the client connections are steady, a state write or
the replica sync briefly holds a file or two) and ``--max-thread-spread`` (16). Threads breathe by design: the
server's two thread pools start workers on demand (Starlette's ``run_in_threadpool``, i.e. anyio's, up to 40, for
uploads, downloads and large answers, each worker ending after 10 s idle; asyncio's default executor, up to
``min(32, cpus + 4)``, for decoding), so at 128 users the count moves between about 23 and 32 with threads ending
and new ones starting. 16 is past that breathing, and a leak of one thread per request, connection, upload (one
every 10 s) or state sync (every 10 s) passes it within a 5-minute run; slower creeps show in the reported medians
of the first and last window and in the counts of threads started and ended after the warm-up. The exit status is
1 when there was any undesigned outcome, the RSS grew too much, fds or threads were not flat, or the server died.

Prints a Markdown table and writes JSON (settings, per-route counts and latencies, error samples, every resource
sample, the verdict, the load average at start and end) to ``bench/results/soak-<timestamp>.json`` (``--out``).
Loopback only, bounded by the duration (plus at most ``--request-timeout`` for the last answers). Usage::

    python bench/soak.py                          # 5 minutes, 128 users
    python bench/soak.py --seconds 30 --concurrency 32 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/soak.py: the repository root

from bench.serve_load import percentile, process_cpu_s  # noqa: E402
from bench.serve_servers import RESULTS_DIR, Server  # noqa: E402
from bench.soak_resources import Sample, assess, sample_every_second  # noqa: E402
from bench.soak_traffic import (  # noqa: E402
    API_KEY,
    UPLOAD_INTERVAL_S,
    Planner,
    Recorder,
    Target,
    UploadClock,
    discover,
    virtual_user,
)


async def run_load(server: Server, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    duration_s = args.seconds if args.seconds is not None else 60.0 * args.minutes
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [
        httpx.AsyncClient(base_url=target.url, limits=limits, timeout=args.request_timeout)
        for _ in range(args.concurrency)
    ]
    uploads = UploadClock(UPLOAD_INTERVAL_S)
    samples: list[Sample] = []
    pid = server.process.pid

    def alive() -> bool:
        return server.process.poll() is None

    started = time.monotonic()
    stop_at = started + duration_s
    recorder = Recorder(warmup_until=started + duration_s * args.warmup_share)
    cpu_before = process_cpu_s(pid)
    load_before = os.getloadavg()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tasks: list[Awaitable[None]] = [
        virtual_user(client, Planner(target, args.seed + index, uploads), recorder, stop_at, alive)
        for index, client in enumerate(clients)
    ]
    try:
        await asyncio.gather(sample_every_second(pid, started, stop_at, samples), *tasks)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    elapsed = time.monotonic() - started
    cpu_s = process_cpu_s(pid) - cpu_before
    undesigned = sum(stats.undesigned for stats in recorder.routes.values())
    verdict = assess(samples, duration_s, args, undesigned, alive())
    requests = sum(sum(stats.statuses.values()) for stats in recorder.routes.values())
    return {
        "meta": {
            "started_at": started_at,
            "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv[1:],
            "duration_s": duration_s,
            "elapsed_s": round(elapsed, 2),
            "concurrency": args.concurrency,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_average_start": [round(x, 2) for x in load_before],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "server_cpu_s": round(cpu_s, 1),
            "requests": requests,
            "requests_per_s": round(requests / elapsed, 1),
            "python": sys.version.split()[0],
        },
        "routes": {
            route: {
                "statuses": dict(sorted(stats.statuses.items())),
                "undesigned": stats.undesigned,
                "measured": len(stats.latencies),
                **latency_summary(stats.latencies),
            }
            for route, stats in sorted(recorder.routes.items())
        },
        "all_routes": latency_summary([x for s in recorder.routes.values() for x in s.latencies]),
        "error_samples": recorder.error_samples,
        "verdict": asdict(verdict),
        "samples": [asdict(s) for s in samples],
    }


def latency_summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {f"p{q}_ms": round(1000 * percentile(ordered, q), 1) for q in (50, 95, 99)}


def markdown(result: dict[str, Any]) -> str:
    meta, verdict = result["meta"], result["verdict"]
    lines = [
        f"soak started {meta['started_at']}: {meta['duration_s']:.0f} s at concurrency {meta['concurrency']}, "
        f"{meta['requests']} requests "
        f"({meta['requests_per_s']}/s), server CPU {meta['server_cpu_s']} s, load average (1/5/15 min) "
        f"{' '.join(map(str, meta['load_average_start']))} at start, {' '.join(map(str, meta['load_average_end']))} "
        f"at end; latencies after the {verdict['warmup_s']:.0f} s warm-up",
        "",
        "| route | requests | 2xx | 429 | 503 | 504 | other | exceptions | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(result["routes"].items()) + [("**all**", None)]
    for route, info in rows:
        if info is None:
            statuses: Counter[str] = Counter()
            for item in result["routes"].values():
                statuses.update(item["statuses"])
            latency = result["all_routes"]
        else:
            statuses, latency = Counter(info["statuses"]), info
        total = sum(statuses.values())
        success = sum(n for s, n in statuses.items() if s.startswith("2"))
        designed = [statuses.get(str(code), 0) for code in (429, 503, 504)]
        other = total - success - sum(designed) - statuses.get("exception", 0)
        lines.append(
            f"| {route} | {total} | {success} | {designed[0]} | {designed[1]} | {designed[2]} | {other} "
            f"| {statuses.get('exception', 0)} | {latency['p50_ms']} | {latency['p95_ms']} | {latency['p99_ms']} |"
        )
    lines += [
        "",
        "| server resource (after warm-up) | first window | last window | min | max |",
        "|---|---:|---:|---:|---:|",
        f"| RSS MiB (growth {verdict['rss_growth_pct']}%, windows of {verdict['window_s']:.0f} s) "
        f"| {verdict['rss_first_mib']} | {verdict['rss_last_mib']} | | |",
        f"| open fds | {verdict['fd_first']} | {verdict['fd_last']} | {verdict['fd_min']} | {verdict['fd_max']} |",
        f"| threads ({verdict['threads_started']} started, {verdict['threads_ended']} ended after the warm-up) "
        f"| {verdict['thread_first']} | {verdict['thread_last']} | {verdict['thread_min']} | {verdict['thread_max']} |",
        "",
        "verdict: " + ("PASS" if not verdict["failures"] else "FAIL: " + "; ".join(verdict["failures"])),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, default=5.0, help="duration (default 5)")
    duration.add_argument("--seconds", type=float, default=None, help="duration in seconds (instead of --minutes)")
    parser.add_argument("--concurrency", type=int, default=128, help="virtual users (default 128)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/soak-*.json)")
    parser.add_argument("--warmup-share", type=float, default=0.2, help="share of the run ignored by the verdict")
    parser.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    parser.add_argument("--max-fd-spread", type=int, default=8)
    parser.add_argument("--max-thread-spread", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.concurrency < 1 or not 0.0 <= args.warmup_share < 1.0:
        parser.error("--concurrency must be >= 1 and --warmup-share in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ood-soak-") as tmp:
        for inherited in ("OOD_API_KEYS_FILE", "OOD_CONFIG"):  # other OOD_* settings of the caller pass through
            os.environ.pop(inherited, None)
        env = {"OOD_STATE_DIR": str(Path(tmp) / "states"), "OOD_API_KEYS": API_KEY, "OOD_LOG_LEVEL": "WARNING"}
        server = Server(env, None, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            target = discover(server.url)
            result = asyncio.run(run_load(server, target, args))
        except BaseException:
            print(Path(server.log.name).read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()
        log_tail = Path(tmp, "server.log").read_text(errors="replace")[-3000:]
    result["server_exit_code"] = server.process.returncode  # after SIGTERM: 0 is a graceful stop
    result["server_log_tail"] = log_tail
    out = args.out or RESULTS_DIR / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    for sample in result["error_samples"][:5]:
        print(f"- {sample['method']} {sample['path']}: {sample['outcome']}: {sample['error']}")
    print(f"\nwrote {out}")
    return 1 if result["verdict"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
