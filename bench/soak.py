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
import base64
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

try:  # imported as bench.soak (repository root on sys.path) or run as bench/soak.py
    from bench.serve import RESULTS_DIR, Server, percentile, process_cpu_s
except ImportError:  # pragma: no cover - script mode: bench/ is sys.path[0]
    from serve import RESULTS_DIR, Server, percentile, process_cpu_s  # type: ignore[no-redef]

API_KEY = "soak-key-0123456789abcdef"
DESIGNED_STATUSES = frozenset({429, 503, 504})
"""Overload answers the service is designed to give (queue full, not ready / too many connections, expired)."""
UPLOAD_NAME = "soak-upload"
UPLOAD_INTERVAL_S = 10.0
MAX_ERROR_SAMPLES = 20
MIX: dict[str, int] = {
    "score": 60,
    "segment": 12,
    "models": 6,
    "detectors": 6,
    "metrics": 5,
    "healthz": 5,
    "download": 3,
    "upload": 3,  # at most one per UPLOAD_INTERVAL_S over all users; otherwise a score request is sent instead
}
"""Relative weights of the request kinds."""


# ---------------------------------------------------------------------------------------------- data
def png(seed: int, height: int, width: int, channels: int = 1) -> bytes:
    """A random image, PNG-encoded (the service decodes and preprocesses it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Target:
    """What the users need to know about the server: its models, detectors and images for them."""

    url: str
    classifier: str
    segmenter: str
    detectors: dict[str, list[str]]
    score_images: list[bytes]
    segment_images: list[bytes]
    state: bytes
    """A downloaded state of the classifier (re-uploaded as UPLOAD_NAME)."""


def discover(url: str) -> Target:
    models = httpx.get(f"{url}/v1/models", timeout=30.0).json()["models"]
    classifier = next(m for m in models if m["task"] == "classification")
    segmenter = next(m for m in models if m["task"] == "segmentation")
    detectors = {m["name"]: sorted(m["detectors"]) for m in models}
    source = "msp" if "msp" in detectors[classifier["name"]] else detectors[classifier["name"]][0]
    state = httpx.get(f"{url}/v1/models/{classifier['name']}/detectors/{source}", timeout=30.0)
    state.raise_for_status()
    ch, cw = classifier["input_size"]
    sh, sw = segmenter["input_size"]
    return Target(
        url=url,
        classifier=classifier["name"],
        segmenter=segmenter["name"],
        detectors=detectors,
        score_images=[png(i, ch, cw) for i in range(4)] + [png(9, 2 * ch, cw + 5, channels=3)],
        segment_images=[png(10 + i, sh, sw) for i in range(2)] + [png(19, sh // 2, sw, channels=3)],
        state=state.content,
    )


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Planned:
    route: str
    method: str
    path: str
    ok: frozenset[int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    results: int | None = None
    """Expected ``len(answer["results"])`` of a 200, when the route has results."""


class Planner:
    """Draws the next request of one virtual user (seeded, so a run is reproducible up to timing)."""

    def __init__(self, target: Target, seed: int, uploads: UploadClock) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.kinds = list(MIX)
        self.weights = [MIX[k] for k in self.kinds]
        self.uploads = uploads

    def _images(self, pool: list[bytes], count: int) -> dict[str, Any]:
        chosen = [self.rng.choice(pool) for _ in range(count)]
        if self.rng.random() < 0.5:
            return {"json": {"instances": [{"b64": base64.b64encode(image).decode()} for image in chosen]}}
        return {"files": [("files", (f"image{i}.png", image, "image/png")) for i, image in enumerate(chosen)]}

    def next(self) -> Planned:
        target, rng = self.target, self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "upload" and not self.uploads.take():
            kind = "score"
        if kind == "score":
            count = rng.randint(1, 4)
            path = f"/v1/models/{target.classifier}/score"
            return Planned("score", "POST", path, frozenset({200}), self._images(target.score_images, count), count)
        if kind == "segment":
            fmt = rng.choice(("png", "npy", "json"))
            count = rng.randint(1, 2)
            path = f"/v1/models/{target.segmenter}/segment?format={fmt}"
            kwargs = self._images(target.segment_images, count)
            return Planned(f"segment?format={fmt}", "POST", path, frozenset({200}), kwargs, count)
        if kind == "models":
            return Planned("models", "GET", "/v1/models", frozenset({200}))
        if kind == "detectors":
            model = rng.choice((target.classifier, target.segmenter))
            return Planned("detectors", "GET", f"/v1/models/{model}/detectors", frozenset({200}))
        if kind == "metrics":
            return Planned("metrics", "GET", "/metrics", frozenset({200}))
        if kind == "healthz":
            return Planned("healthz", "GET", "/healthz", frozenset({200}))
        if kind == "download":
            model = rng.choice((target.classifier, target.segmenter))
            name = rng.choice(target.detectors[model])
            return Planned("download", "GET", f"/v1/models/{model}/detectors/{name}", frozenset({200}))
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/octet-stream"}
        path = f"/v1/models/{target.classifier}/detectors/{UPLOAD_NAME}"
        return Planned("upload", "PUT", path, frozenset({200, 201}), {"content": target.state, "headers": headers})


class UploadClock:
    """At most one upload per ``interval_s`` over all users."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        return True


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class RouteStats:
    statuses: Counter[str] = field(default_factory=Counter)
    """Status code (as a string) or ``exception`` -> count."""
    latencies: list[float] = field(default_factory=list)
    """Seconds, requests sent after the warm-up."""
    undesigned: int = 0


@dataclass
class Recorder:
    warmup_until: float
    routes: dict[str, RouteStats] = field(default_factory=dict)
    error_samples: list[dict[str, Any]] = field(default_factory=list)

    def record(self, planned: Planned, began: float, done: float, outcome: str, error: str | None) -> None:
        stats = self.routes.setdefault(planned.route, RouteStats())
        stats.statuses[outcome] += 1
        if began >= self.warmup_until:
            stats.latencies.append(done - began)
        if error is not None:
            stats.undesigned += 1
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(
                    {"route": planned.route, "method": planned.method, "path": planned.path, "outcome": outcome}
                    | {"error": error[:300], "at_s": round(began - self.warmup_until, 3)}
                )


def judge(planned: Planned, response: httpx.Response) -> str | None:
    """Why the answer is undesigned, or ``None`` when it is fine (success or a designed overload answer)."""
    status = response.status_code
    if status in DESIGNED_STATUSES:
        return None
    if status not in planned.ok:
        return f"status {status}: {response.text[:200]}"
    if planned.results is not None:
        try:
            results = response.json()["results"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable answer: {exc!r}"
        if len(results) != planned.results:
            return f"{len(results)} results for {planned.results} images"
    return None


async def virtual_user(
    client: httpx.AsyncClient, planner: Planner, recorder: Recorder, stop_at: float, alive: Callable[[], bool]
) -> None:
    while time.monotonic() < stop_at and alive():
        planned = planner.next()
        began = time.monotonic()
        try:
            response = await client.request(planned.method, planned.path, **planned.kwargs)
            outcome, error = str(response.status_code), judge(planned, response)
        except Exception as exc:  # every exception is an undesigned outcome: record it and go on
            outcome, error = "exception", f"{type(exc).__name__}: {exc}"
        recorder.record(planned, began, time.monotonic(), outcome, error)


# ---------------------------------------------------------------------------------------------- resources
@dataclass
class Sample:
    t_s: float
    """Seconds since the load started."""
    rss_kib: int
    fds: int
    threads: int
    tids: list[int]
    """Thread ids (``/proc/<pid>/task``): a pool that starts and ends workers shows new ids replacing old ones, a
    leak only adds ids."""


def read_resources(pid: int) -> tuple[int, int, int, list[int]] | None:
    """(VmRSS KiB, open fds, threads, thread ids) of ``pid``, or ``None`` when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        tids = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
    values = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(value.split()[0])
    return values["VmRSS"], fds, values["Threads"], tids


async def sample_every_second(pid: int, started: float, stop_at: float, samples: list[Sample]) -> None:
    while time.monotonic() < stop_at:
        now = time.monotonic()
        resources = await asyncio.to_thread(read_resources, pid)
        if resources is None:
            return
        samples.append(Sample(round(now - started, 3), *resources))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - now)))


@dataclass
class Verdict:
    warmup_s: float
    window_s: float
    rss_first_mib: float
    rss_last_mib: float
    rss_growth_pct: float
    fd_min: int
    fd_max: int
    fd_first: float
    fd_last: float
    thread_min: int
    thread_max: int
    thread_first: float
    thread_last: float
    """Medians of the first and the last window (reported, not judged: the trend of a slow leak)."""
    threads_started: int
    threads_ended: int
    """Threads that appeared / disappeared after the warm-up (ids): a pool that breathes ends threads, a leak not."""
    undesigned: int
    server_alive: bool
    failures: list[str]


def assess(samples: list[Sample], duration_s: float, args: argparse.Namespace, undesigned: int, alive: bool) -> Verdict:
    """RSS growth (last window vs first window after the warm-up), fd and thread spread after the warm-up."""
    warmup_s = duration_s * args.warmup_share
    after = [s for s in samples if s.t_s >= warmup_s]
    window_s = min(60.0, (duration_s - warmup_s) / 3)
    failures: list[str] = []
    if len(after) < 3:
        after = samples[-3:] if len(samples) >= 3 else samples
        failures.append(f"only {len(samples)} resource samples")
    if not after:
        empty = {f.name: 0 for f in fields(Verdict)}
        return Verdict(
            **empty | {"undesigned": undesigned, "server_alive": alive, "failures": [*failures, "no samples"]}
        )
    first = [s for s in after if s.t_s < warmup_s + window_s] or after[:1]
    last = [s for s in after if s.t_s >= duration_s - window_s] or after[-1:]

    def medians(key: Callable[[Sample], int]) -> tuple[float, float]:
        return statistics.median(map(key, first)), statistics.median(map(key, last))

    rss_first, rss_last = medians(lambda s: s.rss_kib)
    fd_first, fd_last = medians(lambda s: s.fds)
    thread_first, thread_last = medians(lambda s: s.threads)
    growth = 100.0 * (rss_last - rss_first) / rss_first
    fds, threads = [s.fds for s in after], [s.threads for s in after]
    at_warmup_end, seen, at_end = set(after[0].tids), {t for s in after for t in s.tids}, set(after[-1].tids)
    if undesigned:
        failures.append(f"{undesigned} undesigned outcomes")
    if not alive:
        failures.append("the server process died")
    if growth >= args.max_rss_growth_pct:
        failures.append(f"RSS grew {growth:.1f}% (limit {args.max_rss_growth_pct}%)")
    if max(fds) - min(fds) > args.max_fd_spread:
        failures.append(f"fds not flat: {min(fds)}..{max(fds)} (spread limit {args.max_fd_spread})")
    if max(threads) - min(threads) > args.max_thread_spread:
        failures.append(f"threads not flat: {min(threads)}..{max(threads)} (spread limit {args.max_thread_spread})")
    return Verdict(
        warmup_s=round(warmup_s, 1),
        window_s=round(window_s, 1),
        rss_first_mib=round(rss_first / 1024, 1),
        rss_last_mib=round(rss_last / 1024, 1),
        rss_growth_pct=round(growth, 2),
        fd_min=min(fds),
        fd_max=max(fds),
        fd_first=fd_first,
        fd_last=fd_last,
        thread_min=min(threads),
        thread_max=max(threads),
        thread_first=thread_first,
        thread_last=thread_last,
        threads_started=len(seen - at_warmup_end),
        threads_ended=len(seen - at_end),
        undesigned=undesigned,
        server_alive=alive,
        failures=failures,
    )


# ---------------------------------------------------------------------------------------------- run
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
