"""The server side of ``bench/soak.py``: its process's resources sampled every second (``VmRSS``, open file
descriptors, threads and their ids, from ``/proc/<pid>``) and the verdict on them after the warm-up
(:func:`assess`: RSS growth between the first and last window, fd and thread spread; see ``bench/soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path


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
