"""DynamicBatcher behaviour without HTTP: batching, splitting, the wait window, errors, shutdown and the observer
(admission, load shedding, expiry and cancellation: ``test_batch_admission.py``).

Timing assertions use lower bounds (a batch never closes before its window) or wide gaps between the two
behaviours being told apart, so they hold on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from service.engine.batcher import BatcherClosedError
from tests.service.engine.batching import ObserverSpy, Recorder, run, settle, started, worker_busy

pytestmark = pytest.mark.timeout(60)


def test_concurrent_single_item_requests_are_batched_together() -> None:
    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=32, max_wait_ms=50)
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(20)))
        await batcher.stop()
        assert results == [[2 * i] for i in range(20)]
        assert max(len(batch) for batch in process.batches) > 1
        assert sorted(process.seen) == list(range(20))

    run(scenario)


def test_max_batch_size_is_respected() -> None:
    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=4, max_wait_ms=50)
        await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(15)))
        await batcher.stop()
        sizes = [len(batch) for batch in process.batches]
        assert max(sizes) == 4
        assert sum(sizes) == 30

    run(scenario)


def test_large_request_is_split_across_batches_with_results_in_order() -> None:
    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=8, max_wait_ms=20)
        big = list(range(42))  # not a multiple of 8: its last batch has room for another request
        small = [1000, 1001, 1002]
        big_result, small_result = await asyncio.gather(batcher.submit(big), batcher.submit(small))
        await batcher.stop()
        assert big_result == [2 * x for x in big]
        assert small_result == [2 * x for x in small]
        assert len(process.batches) >= 6  # 45 items cannot fit in fewer batches of 8
        assert all(len(batch) <= 8 for batch in process.batches)
        # the tail of the big request and the small one share a batch: items of several requests are mixed
        assert any(41 in batch and 1000 in batch for batch in process.batches)

    run(scenario)


def test_lone_item_waits_for_the_window_before_the_batch_closes() -> None:
    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=8, max_wait_ms=200)
        submitted = time.monotonic()
        assert await batcher.submit([3]) == [6]
        await batcher.stop()
        assert process.called_at[0] - submitted >= 0.195

    run(scenario)


def test_wait_is_measured_from_the_first_item_and_never_restarted() -> None:
    """A trickle of items arriving faster than the window must not keep the first batch open."""

    async def scenario() -> None:
        process = Recorder()
        batcher = await started(process, max_batch_size=1000, max_wait_ms=300)
        first = asyncio.create_task(batcher.submit([0]))
        trickle = []
        for i in range(1, 31):  # >= 1.5 s of arrivals, one every 50 ms
            await asyncio.sleep(0.05)
            trickle.append(asyncio.create_task(batcher.submit([i])))
        trickle_ended = time.monotonic()
        assert await first == [0]
        await asyncio.gather(*trickle)
        await batcher.stop()
        # a restarting window would have held item 0 until the trickle stopped (one batch of 31)
        assert process.called_at[0] < trickle_ended - 0.5
        assert 0 in process.batches[0] and len(process.batches[0]) < 31
        assert len(process.batches) >= 2

    run(scenario)


def test_process_error_fails_only_requests_in_that_batch() -> None:
    async def scenario() -> None:
        process = Recorder(fail_on=-1)
        batcher = await started(process, max_batch_size=2, max_wait_ms=50)
        outcomes = await asyncio.gather(
            batcher.submit([1, 2]),  # batch 1: ok
            batcher.submit([-1]),  # batch 2 with 3: fails
            batcher.submit([3]),
            batcher.submit([4]),  # batch 3: ok
            return_exceptions=True,
        )
        await batcher.stop()
        assert process.batches == [[1, 2], [-1, 3], [4]]
        assert outcomes[0] == [2, 4]
        assert isinstance(outcomes[1], ValueError) and isinstance(outcomes[2], ValueError)
        assert outcomes[3] == [8]

    run(scenario)


def test_stop_with_drain_refuses_new_work_and_finishes_accepted_work() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=2, max_wait_ms=0)
        accepted = [asyncio.create_task(batcher.submit([i, i + 10])) for i in range(5)]
        await worker_busy(process)
        stopping = asyncio.create_task(batcher.stop(drain=True))
        await settle()
        with pytest.raises(BatcherClosedError):
            await batcher.submit([99])
        assert not stopping.done()
        process.release.set()
        await stopping
        assert [await task for task in accepted] == [[2 * i, 2 * i + 20] for i in range(5)]
        assert sorted(process.seen) == sorted([*range(5), *range(10, 15)])

    run(scenario)


def test_stop_without_drain_fails_queued_requests_but_answers_the_running_batch() -> None:
    async def scenario() -> None:
        process = Recorder(hold_first=True)
        batcher = await started(process, max_batch_size=1, max_wait_ms=0)
        running = asyncio.create_task(batcher.submit([1]))
        await worker_busy(process)
        queued = [asyncio.create_task(batcher.submit([i])) for i in range(2, 5)]
        await settle()
        stopping = asyncio.create_task(batcher.stop(drain=False))
        await settle()
        process.release.set()
        await stopping
        assert await running == [2]
        for task in queued:
            with pytest.raises(BatcherClosedError):
                await task
        assert process.seen == [1]

    run(scenario)


def test_observer_sees_every_batch_with_queue_waits_and_compute_time() -> None:
    async def scenario() -> None:
        process = Recorder()
        spy = ObserverSpy()
        batcher = await started(process, max_batch_size=4, max_wait_ms=20, name="digits", observer=spy)
        await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        await batcher.stop()
        assert [size for _, size, _, _ in spy.calls] == [len(batch) for batch in process.batches]
        for name, size, waits, compute_s in spy.calls:
            assert name == "digits"
            assert len(waits) == size and all(w >= 0 for w in waits)
            assert compute_s >= 0

    run(scenario)
