"""Where the server's CPU goes per request: ``py-spy record`` of a real ``python -m service`` under closed-loop load.

py-spy launches the server as its child (``py-spy record -- python -m service ...``: no ptrace attach needed),
samples every thread that is running (idle threads are left out, so samples ~ CPU time), and writes collapsed
stacks; this script drives the load with :func:`bench.serve_load.http_load` (one httpx client per virtual user), stops
the server with SIGTERM, and sums the samples into buckets by the first matching frame from the leaf up (the
innermost layer that owns the time: the model forward, decoding, multipart, FastAPI, Starlette, uvicorn, asyncio,
...). The server's total CPU per image over the load window comes from ``/proc`` like in ``bench/serve.py``.
Method and results: ``docs/benchmark-serve.md``. Usage::

    python bench/profile_serve.py --concurrency 64 --duration 8            # the working tree
    python bench/profile_serve.py --source /tmp/base --out /tmp/before.txt   # another tree (before/after)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from serve_load import batch_size_totals, http_load, image_for  # noqa: E402
from serve_servers import ROOT, Server  # noqa: E402

BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    # (bucket, substrings of "function (file)" frames), matched from the leaf frame upwards
    ("model forward (torch)", ("forward (", "_call_impl", "torch/nn/", "graph_module", "normalize (")),
    ("detectors + verdicts", ("ood_core/", "verdicts.py", "calibration")),
    ("batch worker (scoring, batcher thread)", ("scoring.py", "items.py", "collate", "prepare_batch")),
    ("image decode + preprocess", ("decode.py", "preprocess.py", "PIL/")),
    ("multipart + body", ("multipart.py", "bodies.py")),
    ("JSON response", ("json", "render", "orjson", "responses.py")),
    ("metrics + logging", ("metrics.py", "prometheus_client", "logging/", "logs.py")),
    ("batcher (event loop side)", ("batcher.py",)),
    ("our route + middleware + deps", ("service/api/", "submit.py", "service/engine/")),
    ("FastAPI (params, deps, routing)", ("fastapi/", "pydantic")),
    ("Starlette (routing, requests)", ("starlette/",)),
    ("uvicorn + httptools protocol", ("uvicorn/", "httptools", "http_protocol.py")),
    ("asyncio / uvloop event loop", ("asyncio/", "uvloop", "selectors", "events.py")),
    ("threads / executor", ("threading.py", "concurrent/")),
]


PYSPY_EXTRA = os.environ.get("PYSPY_EXTRA", "--nonblocking --threads").split()
STARTUP = ("importlib._bootstrap", "_load_model", "create_app", "ensure_demo", "load_settings", "run_sync_loop")
"""Frames of start-up work (imports, model building, fitting the demo states): py-spy samples the server from
its first instruction, so stacks through these are left out of the summary."""


def bucket_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in BUCKETS:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def summarize(raw: Path, images: int, cpu_s: float, seconds: float) -> str:
    """Samples per bucket (share and estimated CPU ms per image) and the 15 hottest leaf functions."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if any(marker in stack for marker in STARTUP):
            continue
        n = int(count)
        total += n
        buckets[bucket_of(stack)] += n
        leaves[stack.split(";")[-1].split(" (")[0] + " (" + stack.split(";")[-1].split("(")[-1].split(":")[0]] += n
    per_image = 1000 * cpu_s / images if images else float("nan")
    lines = [
        f"images {images} in {seconds:.1f} s ({images / seconds:.0f} img/s), server CPU {per_image:.3f} ms/image, "
        f"{total} samples",
        "",
        "| where (innermost owning layer) | share of samples | ~CPU ms / image |",
        "|---|---:|---:|",
    ]
    for name, n in buckets.most_common():
        lines.append(f"| {name} | {100 * n / total:.1f}% | {per_image * n / total:.3f} |")
    lines += ["", "hottest leaf functions:", ""]
    lines += [f"- {100 * n / total:.1f}% {leaf}" for leaf, n in leaves.most_common(15)]
    return "\n".join(lines)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread of process ``pid`` (Linux ``/proc``), keyed ``main`` (the event
    loop: uvicorn runs it in the main thread) or ``<comm>-<tid>``."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (
                "main (event loop)" if task.name == str(pid) else f"{(task / 'comm').read_text().strip()}-{task.name}"
            )
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def per_thread(before: dict[str, float], after: dict[str, float], images: float) -> str:
    lines = ["", "| thread (name) | CPU ms / image |", "|---|---:|"]
    for name in sorted(after, key=lambda n: before.get(n, 0.0) - after[n]):
        spent = after[name] - before.get(name, 0.0)
        if spent > 0:
            lines.append(f"| {name} | {1000 * spent / images:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--source", type=Path, default=ROOT, help="source tree whose service runs")
    parser.add_argument("--env", nargs="*", default=[], help="extra NAME=VALUE for the server")
    parser.add_argument("--out", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="ood-profile-") as tmp:
        work = Path(tmp)
        raw = work / "profile.txt"
        env = {"OOD_STATE_DIR": str(work / "states"), "OOD_LOG_LEVEL": "WARNING"}
        env.update(dict(item.split("=", 1) for item in args.env))
        warm = Server(env, None, work / "fit.log", args.source)  # first start fits the demo states, unprofiled
        warm.wait_ready()
        warm.stop()
        prefix = [py_spy, "record", "--format", "raw", "--rate", str(args.rate), *PYSPY_EXTRA, "-o", str(raw), "--"]
        server = Server(env, None, work / "server.log", args.source, prefix=prefix)
        try:
            server.wait_ready()
            model = "digits"
            info = httpx.get(f"{server.url}/v1/models/{model}", timeout=10).json()
            image = image_for(info)
            load = http_load(
                server.url,
                f"/v1/models/{model}/score",
                image,
                args.concurrency,
                args.duration,
                args.warmup,
                1,
                server.server_pid(),
            )
            began = time.monotonic()
            pid = server.server_pid()
            threads_before = thread_cpu_s(pid)
            images_before = batch_size_totals(httpx.get(f"{server.url}/metrics").text)[0]
            result = asyncio.run(load)
            images_after = batch_size_totals(httpx.get(f"{server.url}/metrics").text)[0]
            threads = per_thread(threads_before, thread_cpu_s(pid), images_after - images_before)
            print(f"load done in {time.monotonic() - began:.1f} s, {result.errors} errors", flush=True)
        finally:
            server.stop()
        deadline = time.monotonic() + 30
        while not raw.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = summarize(raw, result.images, result.server_cpu_s, result.elapsed) + "\n" + threads
        if args.out is not None:
            shutil.copy(raw, args.out.with_suffix(".raw"))
        text += f"\n\nload average (1 min) {os.getloadavg()[0]:.2f}; source {args.source}; env {args.env}"
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
