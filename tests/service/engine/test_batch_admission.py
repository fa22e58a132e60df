"""The batcher's admission side without HTTP (``service/engine/batch_admission.py``): all-or-nothing admission to
the bounded queue, deadlines, cancellation, and submitting outside start/stop."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.engine.batcher import BatcherClosedError, DynamicBatcher, QueueFullError, RequestTimeoutError
from tests.service.engine.batching import Recorder, run, settle, started, worker_busy

pytestmark = pytest.mark.timeout(60)


def test_full_queue_refuses_whole_request_and_enqueues_nothing() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=2, max_wait_ms=0, max_queue=4)
        blocker = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        waiting = [asyncio.create_task(batcher.submit([1, 2])), asyncio.create_task(batcher.submit([3]))]
        await settle()
        assert batcher.queue_depth == 3
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit([4, 5])  # 2 items, 1 free slot: all-or-nothing
        assert refused.value.retry_after_s > 0
        assert batcher.queue_depth == 3
        last = asyncio.create_task(batcher.submit([6]))  # exactly fills the queue
        await settle()
        assert batcher.queue_depth == 4
        process.release.set()
        assert await blocker == [0]
        assert [await task for task in waiting] == [[2, 4], [6]]
        assert await last == [12]
        await batcher.stop()
        assert 4 not in process.seen and 5 not in process.seen

    run(scenario)


def test_request_past_its_deadline_gets_timeout_and_is_never_processed() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=4, max_wait_ms=0)
        blocker = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        began = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await batcher.submit([7, 8], timeout_s=0.2)
        assert 0.19 <= time.monotonic() - began < 5.0  # submit waits at most until the deadline
        assert batcher.queue_depth == 0  # expired items no longer hold queue capacity
        process.release.set()
        assert await blocker == [0]
        assert await batcher.submit([9]) == [18]
        await batcher.stop()
        assert 7 not in process.seen and 8 not in process.seen

    run(scenario)


def test_cancelled_request_has_its_remaining_items_skipped() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=4, max_wait_ms=0)
        blocker = asyncio.create_task(batcher.submit([0]))
        await worker_busy(process)
        gone = asyncio.create_task(batcher.submit([5, 6, 7]))
        kept = asyncio.create_task(batcher.submit([8]))
        await settle()
        gone.cancel()
        await settle()
        assert gone.cancelled()
        assert batcher.queue_depth == 1
        process.release.set()
        assert await blocker == [0]
        assert await kept == [16]
        await batcher.stop()
        assert not {5, 6, 7} & set(process.seen)

    run(scenario)


def test_submit_outside_start_stop_is_refused_and_empty_request_is_trivial() -> None:
    async def scenario() -> None:
        process = Recorder()
        batcher: DynamicBatcher[int, int] = DynamicBatcher(process)
        with pytest.raises(BatcherClosedError):
            await batcher.submit([1])
        await batcher.start()
        assert await batcher.submit([]) == []
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            await batcher.submit([1])
        assert process.batches == []

    run(scenario)
