"""Intra-op threads of a model's batch worker on the CPU: picked at warm-up from a measurement, or set.

PyTorch runs each CPU operator on ``torch.get_num_threads()`` OpenMP threads (by default one per core). For a
small network that is slower, not faster: every operator's parallel region costs a wake-up and a barrier, more
than the work it splits, and the event loop (HTTP, decoding) needs a core too. On the demo (2 vCPUs,
``OMP_WAIT_POLICY=PASSIVE``), ``process_batch`` of 1 image took 0.88 ms on one thread against 1.2-1.6 ms on two,
of 16 images 2.8 ms against 3.5-4.6 ms, and used less CPU either way; a 224 px resnet is the opposite. So, with
``intra_op_threads = 0`` (the default), :func:`pick_threads` times a full warm-up batch on the default thread
count and on one thread, in the worker thread itself (best of a few interleaved runs), and keeps the default only
if it is at least :data:`MIN_SPEEDUP` times faster; a batch longer than :data:`LONG_BATCH_S` keeps the default
unmeasured. (A batch of one is not the criterion: it always favours one thread, and a model is served at its
load's batch sizes.)

The setting is per thread: once a thread has set up OpenMP (its first parallel operator or
``torch.get_num_threads()``; the functions here do that first), ``torch.set_num_threads`` in another thread does
not change it (threads created later start from the last value set anywhere, which :func:`restore_default`
puts back), so each model's worker keeps its own choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

TUNING_RUNS = 3
"""Interleaved timed runs per candidate (after one untimed run each)."""
MIN_SPEEDUP = 1.25
"""The default thread count is kept only if it runs a full batch at least this much faster than one thread: its
parallel regions take that many cores from the event loop and decoding, and a near tie is noise (the demo's
full batch: 7.5 ms on one thread, 5.9-8.3 ms on two, from run to run)."""
LONG_BATCH_S = 0.25
"""A full batch slower than this on the default thread count keeps it without measuring."""


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    seconds: dict[int, float]
    """Best time of a full batch per candidate thread count (empty when the count was set, not measured)."""


def pick_threads(
    run_batch: Callable[[], object], default: int, runs: int = TUNING_RUNS, long_batch_s: float = LONG_BATCH_S
) -> ThreadChoice:
    """In the calling thread: time ``run_batch`` on ``default`` threads and on one, leave the choice set (the module
    docstring's rule). A batch
    that takes longer than ``long_batch_s`` on ``default`` threads keeps them unmeasured (enough work per operator
    for the parallel regions to pay; start-up stays short)."""
    torch.get_num_threads()  # the thread's lazy OpenMP set-up first: it would later reset what is set now
    torch.set_num_threads(default)
    started = time.perf_counter()
    run_batch()  # untimed for the choice: first-run allocations and kernel selection
    first = time.perf_counter() - started
    if default <= 1 or first > long_batch_s:
        return ThreadChoice(default, {default: first})
    candidates = [default, 1]
    best = {count: float("inf") for count in candidates}
    torch.set_num_threads(1)
    run_batch()
    for _ in range(runs):
        for count in candidates:
            torch.set_num_threads(count)
            started = time.perf_counter()
            run_batch()
            best[count] = min(best[count], time.perf_counter() - started)
    chosen = default if best[default] * MIN_SPEEDUP <= best[1] else 1
    torch.set_num_threads(chosen)
    return ThreadChoice(chosen, best)


def set_threads(count: int) -> ThreadChoice:
    """In the calling thread: a configured thread count."""
    torch.get_num_threads()  # as in pick_threads
    torch.set_num_threads(count)
    return ThreadChoice(count, {})


def restore_default(count: int) -> None:
    """Put the count threads created from now on start with back to ``count`` (call it outside the workers)."""
    torch.set_num_threads(count)
