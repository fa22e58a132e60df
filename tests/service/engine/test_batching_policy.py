"""The adaptive batching policy of DynamicBatcher, without HTTP: an idle worker starts at once, a busy one lets
arrivals accumulate into the next batch, a full batch is prepared while the previous one computes, and the
guarantees (deadlines, drain, cancellation, failure isolation, bounded queue) hold for batches waiting in between.

The worker is held on a gate, so "while busy" is a state the test controls, not a timing guess; the only timing
assertions compare a start "at once" (well under a second) against a window of a second or more.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from service.engine import batcher as batcher_module
from service.engine.batcher import BatcherClosedError, DynamicBatcher, RequestTimeoutError
from tests.service.engine.test_batcher import Recorder, run, settle, worker_busy

pytestmark = pytest.mark.timeout(60)


class Preparer:
    """A ``prepare`` for :class:`Recorder`: records the batches it staged and the thread it ran on; the returned
    callable finishes the work through the recorder (so results and gates are the recorder's)."""

    def __init__(self, recorder: Recorder, fail_on: object = None) -> None:
        self.recorder = recorder
        self.fail_on = fail_on
        self.staged: list[list[Any]] = []
        self.threads: list[str] = []
        self.during_busy: list[bool] = []

    def __call__(self, items: list[Any]) -> Callable[[], list[Any]]:
        self.staged.append(list(items))
        self.threads.append(threading.current_thread().name)
        self.during_busy.append(self.recorder.entered.is_set() and not self.recorder.release.is_set())
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot stage {self.fail_on!r}")
        return lambda: self.recorder(items)


async def started(process: Recorder, **kwargs: Any) -> DynamicBatcher[Any, Any]:
    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(process, **kwargs)
    await batcher.start()
    return batcher


def test_default_is_adaptive_and_a_lone_item_starts_at_once() -> None:
    async def scenario() -> None:
        adaptive, windowed = Recorder(), Recorder()
        fast = await started(adaptive, max_batch_size=32)  # the default max_wait_ms is 0
        slow = await started(windowed, max_batch_size=32, max_wait_ms=1000)
        assert fast.max_wait_s == 0.0
        submitted = time.monotonic()
        assert await fast.submit([3]) == [6]
        started_after = adaptive.called_at[0] - submitted
        submitted = time.monotonic()
        assert await slow.submit([3]) == [6]
        assert started_after < 0.5  # at once (a loaded machine may add scheduling delay, never a window)
        assert windowed.called_at[0] - submitted >= 0.95  # the optional window does wait
        await fast.stop()
        await slow.stop()

    run(scenario)


def test_items_arriving_while_the_worker_is_busy_form_the_next_batch_together() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=8)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        arrivals = [asyncio.create_task(batcher.submit([i])) for i in range(1, 6)]
        await settle()
        assert batcher.in_flight == 1 and batcher.queue_depth == 5  # accumulating, not started one by one
        process.release.set()
        assert await first == [0]
        assert [await task for task in arrivals] == [[2 * i] for i in range(1, 6)]
        await batcher.stop()
        assert process.batches == [[0], [1, 2, 3, 4, 5]]

    run(scenario)


def test_the_next_batch_takes_at_most_max_batch_size_the_rest_follows() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=4)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        arrivals = [asyncio.create_task(batcher.submit([i])) for i in range(1, 11)]
        await settle()
        process.release.set()
        await first
        await asyncio.gather(*arrivals)
        await batcher.stop()
        assert process.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]  # oldest first, full batches

    run(scenario)


def test_a_full_batch_is_prepared_while_the_previous_one_computes() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        prepare = Preparer(process)
        batcher = await started(process, prepare=prepare, max_batch_size=3)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        assert prepare.staged == []  # an idle worker's batch goes straight to `process`, no thread hop
        full = asyncio.create_task(batcher.submit([1, 2, 3]))
        partial = asyncio.create_task(batcher.submit([4]))
        for _ in range(200):  # the full batch is staged in the prepare thread while the worker is held
            if prepare.staged:
                break
            await asyncio.sleep(0.01)
        assert prepare.staged == [[1, 2, 3]] and prepare.during_busy == [True]
        assert prepare.threads[0].startswith("prepare-")
        assert batcher.queue_depth == 4 and batcher.in_flight == 1  # the staged batch still counts as waiting
        process.release.set()
        assert (await first, await full, await partial) == ([0], [2, 4, 6], [8])
        await batcher.stop()
        assert process.batches == [[0], [1, 2, 3], [4]]

    run(scenario)


def test_a_window_does_not_split_a_busy_workers_accumulation() -> None:
    """With ``max_wait_ms`` the window only delays an IDLE worker: arrivals during a long batch still wait for it
    to free and then go together, even if the window of the oldest has long passed."""

    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=16, max_wait_ms=20)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        early = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.2)  # ten windows
        late = asyncio.create_task(batcher.submit([2]))
        await settle()
        process.release.set()
        assert (await first, await early, await late) == ([0], [2], [4])
        await batcher.stop()
        assert process.batches == [[0], [1, 2]]

    run(scenario)


def test_deadline_passing_in_a_staged_batch_gives_504_and_the_item_is_never_computed() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        prepare = Preparer(process)
        batcher = await started(process, prepare=prepare, max_batch_size=2)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        expiring = asyncio.create_task(batcher.submit([5], timeout_s=0.2))
        kept = asyncio.create_task(batcher.submit([6]))
        with pytest.raises(RequestTimeoutError):
            await expiring
        assert batcher.queue_depth == 1  # its item left the staged batch
        process.release.set()
        assert await first == [0] and await kept == [12]
        await batcher.stop()
        assert prepare.staged == [[5, 6]]  # staged together before the deadline...
        assert process.batches == [[0], [6]]  # ...but only the live item was computed

    run(scenario)


def test_cancelled_request_in_a_staged_batch_is_skipped_and_its_batch_mates_answered() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, prepare=Preparer(process), max_batch_size=3)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        gone = asyncio.create_task(batcher.submit([5, 6]))
        kept = asyncio.create_task(batcher.submit([7]))
        await settle()
        gone.cancel()
        await settle()
        process.release.set()
        assert await first == [0] and await kept == [14]
        await batcher.stop()
        assert gone.cancelled() and not {5, 6} & set(process.seen)

    run(scenario)


def test_a_failing_prepare_fails_only_its_batch() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, prepare=Preparer(process, fail_on=-1), max_batch_size=2)
        first = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        doomed = [asyncio.create_task(batcher.submit([-1])), asyncio.create_task(batcher.submit([3]))]
        await settle()
        process.release.set()
        assert await first == [0]
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)
        assert await batcher.submit([4]) == [8]  # the batcher keeps working
        await batcher.stop()

    run(scenario)


def test_drain_answers_queued_and_staged_batches_and_no_drain_fails_them() -> None:
    async def scenario(drain: bool) -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, prepare=Preparer(process), max_batch_size=2)
        running = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        waiting = [asyncio.create_task(batcher.submit([i, i + 10])) for i in range(1, 4)]
        await settle()
        stopping = asyncio.create_task(batcher.stop(drain=drain))
        await settle()
        with pytest.raises(BatcherClosedError):
            await batcher.submit([99])
        process.release.set()
        await stopping
        assert await running == [0]
        if drain:
            assert [await task for task in waiting] == [[2 * i, 2 * i + 20] for i in range(1, 4)]
        else:
            for task in waiting:
                with pytest.raises(BatcherClosedError):
                    await task
            assert process.seen == [0]

    run(lambda: scenario(True))
    run(lambda: scenario(False))


def test_an_idle_worker_waits_for_announced_requests_and_only_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests the event loop is already handling (announced with ``arriving()``) join the batch of a queued
    item; one that gives up (a bad body, say) releases the wait at once. The cap is raised to a second here so
    that the test does not depend on how fast this machine is; the service's is 2 ms."""
    monkeypatch.setattr(batcher_module, "ARRIVING_WAIT_S", 1.0)

    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=8)
        with batcher.arriving() as late:
            first = asyncio.create_task(batcher.submit([1]))
            await asyncio.sleep(0.1)  # decoding, say
            assert process.batches == []  # the queued item waits for the announced one
            second = asyncio.create_task(batcher.submit([2], arrival=late))
            assert (await first, await second) == ([2], [4])
        assert process.batches == [[1, 2]]
        gave_up = batcher.arriving()
        submitted = time.monotonic()
        third = asyncio.create_task(batcher.submit([3]))
        await settle()
        gave_up.close()  # e.g. its body was refused: nothing more is coming
        assert await third == [6]
        assert process.called_at[-1] - submitted < 0.5
        assert await batcher.submit([4]) == [8]  # nothing announced: at once, alone
        await batcher.stop()
        assert process.batches == [[1, 2], [3], [4]]

    run(scenario)


def test_an_announced_request_that_never_comes_delays_a_batch_by_at_most_the_cap() -> None:
    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=8)
        with batcher.arriving():
            submitted = time.monotonic()
            assert await batcher.submit([5]) == [10]
            waited = process.called_at[0] - submitted
        await batcher.stop()
        assert batcher_module.ARRIVING_WAIT_S - 0.0005 <= waited < 0.5

    run(scenario)
