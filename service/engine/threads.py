"""Intra-op threads of a model's batch worker on the CPU, per batch size: measured at warm-up, or set.

PyTorch runs each CPU operator on ``torch.get_num_threads()`` OpenMP threads (by default one per core). Whether
that pays depends on the work per operator, so on the network AND the batch size: every parallel region costs a
wake-up and a barrier, and the event loop (HTTP, decoding) needs a core too. On 2 vCPUs
(``OMP_WAIT_POLICY=PASSIVE``) the demo's ``process_batch`` of 1 image took 0.88 ms on one thread against
1.2-1.6 ms on two, of 16 images 2.8 ms against 3.5-4.6 ms; a resnet18 at 64 px served at concurrency 1 cost
17.1 ms of server CPU per image on two threads against 12.7 on one (and was 0.81x as fast), while its full batch of
32 runs faster on two. So the worker's thread count follows the batch it runs: with ``intra_op_threads = 0`` (the
default), :func:`plan_threads` times each batch size of :data:`batch_sizes` (1, 2, 4, ... up to the maximum) on
torch's default count and on one thread, in the worker thread itself (best of 3-12 interleaved runs), and keeps
the default only where it is at least :data:`MIN_SPEEDUP` times faster; from the first size whose batch takes
longer than :data:`LONG_BATCH_S` on the default count, the default is kept unmeasured (enough work per operator;
start-up stays short). :meth:`ThreadPlan.apply` then sets the count for each batch (only when it changes).

The setting is per thread: once a thread has set up OpenMP (its first parallel operator or
``torch.get_num_threads()``; the functions here do that first), ``torch.set_num_threads`` in another thread does
not change it (threads created later start from the last value set anywhere, which :func:`restore_default`
puts back), so each model's worker keeps its own plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TUNING_RUNS = 3
"""Interleaved timed runs per candidate at least (after one untimed run each)..."""
MAX_RUNS = 12
SIZE_BUDGET_S = 0.6
"""... and more, up to :data:`MAX_RUNS`, while a size has taken less than this and the speed-up is within
:data:`CLOSE_FACTOR` of :data:`MIN_SPEEDUP`: the best of a few runs of a cheap batch is noisy (resnet18 at 224 px,
one image on two threads against one: 38.4 vs 55.9 ms in one start, 44.7 vs 53.2 in the next, which then kept one
thread); a clear case stops at :data:`TUNING_RUNS` (start-up stays short: every app start runs the plan)."""
CLOSE_FACTOR = 1.15
MIN_SPEEDUP = 1.25
"""The default thread count is kept only where it runs a batch at least this much faster than one thread: its
parallel regions take that many cores from the event loop and decoding, and a near tie is noise (the demo's full
batch: 7.5 ms on one thread, 5.9-8.3 ms on two, from run to run)."""
LONG_BATCH_S = 0.25
"""From the first batch size slower than this on the default thread count, the default is kept unmeasured."""


def batch_sizes(max_batch_size: int) -> list[int]:
    """The sizes measured: powers of two below the maximum, and the maximum."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


@dataclass
class ThreadPlan:
    """Threads per batch size: ``steps`` of ``(from_size, threads)`` in increasing size (the first from 1)."""

    steps: list[tuple[int, int]]
    seconds: dict[int, dict[int, float]] = field(default_factory=dict)
    """Best time per measured batch size and thread count (empty when the count was set, not measured)."""
    _current: int = 0

    def threads_for(self, size: int) -> int:
        chosen = self.steps[0][1]
        for from_size, count in self.steps:
            if size >= from_size:
                chosen = count
        return chosen

    def apply(self, size: int) -> None:
        """In the worker thread, before a batch of ``size``: its thread count (set only when it changes)."""
        count = self.threads_for(size)
        if count != self._current:
            torch.set_num_threads(count)
            self._current = count

    def describe(self) -> dict[str, int]:
        """``{"1": threads, "8": threads, ...}``: the thread count from each step's batch size on (for the log)."""
        return {str(from_size): count for from_size, count in self.steps}


def _close_call(one: float, default: float) -> bool:
    """Whether a speed-up of ``one / default`` is within 15% of :data:`MIN_SPEEDUP` either way (worth more runs)."""
    return MIN_SPEEDUP / CLOSE_FACTOR < one / default < MIN_SPEEDUP * CLOSE_FACTOR


def _time(run: Callable[[], object], count: int) -> float:
    torch.set_num_threads(count)
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def plan_threads(
    run_batch: Callable[[int], object],
    sizes: list[int],
    default: int,
    runs: int = TUNING_RUNS,
    long_batch_s: float = LONG_BATCH_S,
    budget_s: float = SIZE_BUDGET_S,
) -> ThreadPlan:
    """In the calling thread: time ``run_batch(size)`` for each of ``sizes`` (increasing) on ``default`` threads and
    on one; the plan of the module docstring's rule."""
    torch.get_num_threads()  # the thread's lazy OpenMP set-up first: it would later reset what is set now
    chosen: dict[int, int] = {}
    seconds: dict[int, dict[int, float]] = {}
    long = default <= 1
    for size in sizes:
        if long:
            chosen[size] = default
            continue

        def run(size: int = size) -> object:
            return run_batch(size)

        first = _time(run, default)  # untimed for the choice: first-run allocations and kernel selection
        if first > long_batch_s:
            long, chosen[size], seconds[size] = True, default, {default: first}
            continue
        _time(run, 1)
        best = {default: float("inf"), 1: float("inf")}
        began, done = time.perf_counter(), 0
        while done < runs or (
            done < MAX_RUNS and time.perf_counter() - began < budget_s and _close_call(best[1], best[default])
        ):
            for count in (default, 1):
                best[count] = min(best[count], _time(run, count))
            done += 1
        chosen[size] = default if best[default] * MIN_SPEEDUP <= best[1] else 1
        seconds[size] = best
    steps: list[tuple[int, int]] = []
    for index, size in enumerate(sizes):
        if not steps or steps[-1][1] != chosen[size]:
            steps.append((1 if index == 0 else size, chosen[size]))
    plan = ThreadPlan(steps, seconds)
    plan.apply(sizes[-1])
    return plan


def fixed_plan(count: int) -> ThreadPlan:
    """In the calling thread: a configured thread count for every batch."""
    torch.get_num_threads()  # as in plan_threads
    plan = ThreadPlan([(1, count)])
    plan.apply(1)
    return plan


def restore_default(count: int) -> None:
    """Put the count threads created from now on start with back to ``count`` (call it outside the workers)."""
    torch.set_num_threads(count)
