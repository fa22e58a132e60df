"""Adaptive batching: collect items (images) from concurrent requests into one call of the model.

One small asyncio class in the spirit of LitServe's ``collate_requests`` and infinity's bounded queues with load
shedding. The batching policy (``max_wait_ms = 0``, the default):

* **an idle worker starts at once** with whatever is queued: a lone request is never held back. The one
  exception is work already on its way: requests that announced themselves (:meth:`DynamicBatcher.arriving`,
  e.g. from the moment a route has resolved its model until its images are submitted: reading and decoding on
  the event loop take a fraction of a millisecond) are waited for, at most :data:`ARRIVING_WAIT_S` after the
  oldest queued item; with nothing arriving (a lone request) there is no wait at all;
* **a busy worker lets arrivals accumulate**: the next batch is closed the moment the worker frees, with up to
  ``max_batch_size`` of the oldest items; a batch that is already full while the worker computes is closed (and
  prepared, below) at once;
* ``max_wait_ms > 0`` adds a window for devices where a fuller batch is worth waiting for: an idle worker also
  waits until ``max_wait_ms`` have passed since the oldest queued item arrived (never restarted by later arrivals)
  or the batch is full.

So batching never delays an item more than ``max_wait_ms`` beyond the time the worker needs for the batches ahead
of it, and under load the batch size follows the arrival rate during one batch's compute.

**Overlap.** With a ``prepare`` callable (``prepare(inputs)`` does the first part of ``process(inputs)`` and
returns the rest as a callable), a batch closed while the worker computes is prepared in a one-thread pool at once
(e.g. stacked and copied to the GPU), so the worker goes from one batch straight to the next. A batch closed while
the worker is idle is processed in one go (``process``) in the worker: a thread hop would cost more than it hides.

Guarantees:

* the queue (waiting items, including a closed batch waiting for the worker) is bounded in ITEMS, not requests;
  admission is all-or-nothing per request: a request whose items do
  not fit in the free capacity is refused at once with :class:`QueueFullError` (HTTP 429 + ``Retry-After``);
* a request of many items is split across batches; its future resolves when all its items are done, with results
  in request order;
* ``process`` runs in ONE worker thread, off the event loop: the model sees one batch at a time, mixing items of
  several requests;
* failures are isolated per batch: an exception in ``process`` (or ``prepare``) fails exactly the requests with
  items in that batch; a request past its deadline gets :class:`RequestTimeoutError` (504) and is never processed;
  a cancelled request (client gone) has its remaining items skipped; ``stop(drain=True)`` refuses new work and
  finishes everything accepted, ``stop(drain=False)`` answers the running batch and fails what is still waiting
  with :class:`BatcherClosedError`. Every accepted item ends in a result or an exception, never silence.

Per request the event loop does little: one future, one timer handle for the deadline (no ``asyncio.wait`` /
``wait_for``, which wrap every wait in a task); the batching loop sleeps on one plain future that ``submit`` and
the worker resolve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from service.engine.batch_admission import Arrival, BatchQueue
from service.engine.batch_parts import (
    BatcherClosedError,
    BatcherError,
    BatchObserver,
    ClosedBatch,
    QueuedItem,
    QueueFullError,
    RequestTimeoutError,
    Wakeup,
)

T = TypeVar("T")
R = TypeVar("R")
R2 = TypeVar("R2")

logger = logging.getLogger(__name__)

__all__ = [
    "ARRIVING_WAIT_S",
    "Arrival",
    "BatchObserver",
    "BatcherClosedError",
    "BatcherError",
    "DynamicBatcher",
    "QueueFullError",
    "RequestTimeoutError",
]

ARRIVING_WAIT_S = 0.002
"""How long an idle worker may wait for announced requests (:meth:`DynamicBatcher.arriving`) to be submitted,
counted from the oldest queued item: a batch of everything the event loop is already handling costs one forward
instead of several, and the worker does not take the CPU the event loop needs to finish them."""


class DynamicBatcher(BatchQueue[T, R]):
    """Batch items of concurrent :meth:`submit` calls into calls of ``process(list[T]) -> list[R]``.

    ``process`` must return exactly one result per input, in order; ``prepare(inputs)()`` must equal
    ``process(inputs)``. ``timeout_s`` is the default per-request deadline, counted from admission. Times are
    ``time.monotonic()`` seconds.
    """

    def __init__(
        self,
        process: Callable[[list[T]], list[R]],
        *,
        prepare: Callable[[list[T]], Callable[[], list[R]]] | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        timeout_s: float = 30.0,
        name: str = "",
        observer: BatchObserver | None = None,
    ) -> None:
        super().__init__(max_batch_size, max_wait_ms, max_queue, timeout_s, name)
        self.process = process
        self.prepare = prepare
        self.observer = observer
        self._batch_ready = Wakeup()
        """The worker loop's: a closed batch, closing."""
        self._worker_task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._preparer: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the batching loop, its worker thread and (with ``prepare``) its prepare thread (idempotent)."""
        if self._task is not None:
            return
        self._closing = False
        label = self.name or "model"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{label}")
        if self.prepare is not None:
            self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prepare-{label}")
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, drain: bool = True) -> None:
        """Close admission; finish every accepted item (``drain``) or fail the waiting ones, then stop the loop."""
        self._closing = True
        if not drain:
            self._fail_waiting(BatcherClosedError("batcher stopped before this request was processed"))
        self._wake()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})
        for pool in (self._executor, self._preparer):
            if pool is not None:
                pool.shutdown(wait=True)
        self._executor = self._preparer = None

    async def run_in_worker(self, fn: Callable[[], R2]) -> R2:
        """Run ``fn`` in the worker thread, after the batch it computes (e.g. per-thread settings at start-up)."""
        if self._executor is None:
            raise BatcherClosedError()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ------------------------------------------------------------------ batching loop

    def _wake(self) -> None:
        self._wakeup.set()
        self._batch_ready.set()

    def _close_now(self) -> bool | float:
        """Whether the queued items form a batch now (True), later at a time (a deadline) or on a wake-up (False).

        Called with a non-empty queue of live items and no batch waiting for the worker."""
        if len(self._queue) >= self.max_batch_size or self._closing:
            return True
        if self.busy:
            return False  # accumulate until the worker frees (it wakes us) or the batch is full
        oldest = self._queue[0].enqueued_at
        window_end = oldest + self.max_wait_s
        if self._arriving > 0:  # work already on its way: wait for it (its submit or give-up wakes us)
            window_end = max(window_end, oldest + ARRIVING_WAIT_S)
        return True if time.monotonic() >= window_end else window_end

    def _take(self) -> list[QueuedItem[T, R]]:
        """Pop up to ``max_batch_size`` of the oldest queued items (every queued item is live: finished requests
        remove theirs)."""
        count = min(self.max_batch_size, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _run(self) -> None:
        """Close batches by the policy; hand each to the worker task (preparing it first when the worker is busy)."""
        loop = asyncio.get_running_loop()
        self._worker_task = asyncio.create_task(self._work(loop), name=f"batcher-worker-{self.name}")
        try:
            while True:
                if self._next is not None or not self._queue:
                    if self._closing and not self._queue and self._next is None:
                        break
                    await self._wakeup.wait()
                    continue
                decision = self._close_now()
                if decision is not True:
                    await self._wakeup.wait(None if decision is False else float(decision))
                    continue
                items = self._take()
                inputs = [item.request.items[item.index] for item in items]
                if self.busy and self.prepare is not None and self._preparer is not None:
                    run: Any = loop.run_in_executor(self._preparer, self.prepare, inputs)
                else:
                    run = partial(self.process, inputs)
                self._next = ClosedBatch(items, run, len(items))
                self._batch_ready.set()
        finally:
            self._closing = True
            self._wake()
            worker, self._worker_task = self._worker_task, None
            await asyncio.wait({worker})
            # only non-empty if the loop task itself was cancelled: still answer everyone
            self._fail_waiting(BatcherClosedError("batcher stopped before this request was processed"))
            self._queue.clear()

    async def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker side: run each closed batch in the worker thread; never dies on a batch's error."""
        while True:
            batch = self._next
            if batch is None:
                if self._closing and not self._queue:
                    return
                await self._batch_ready.wait()
                continue
            self._next = None
            self._running = batch.items
            self._wakeup.set()  # room for the next batch: it may close (and be prepared) while this one computes
            try:
                await self._compute(loop, batch)
            except Exception as error:  # never let the loop die: fail the batch instead
                logger.exception("batcher %s: unexpected error", self.name)
                for item in batch.items:
                    item.request.fail(error)
            finally:
                self._running = []
                self._wakeup.set()

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: ClosedBatch[T, R]) -> None:
        error: Exception | None = None
        results: list[R] = []
        started = time.monotonic()
        try:
            run = await batch.run if isinstance(batch.run, asyncio.Future) else batch.run
            started = time.monotonic()
            items = self._live(batch.items, started)
            if not items:
                return
            if len(items) < batch.closed_with:  # requests gone or expired since the batch closed: skip their items
                inputs = [item.request.items[item.index] for item in items]
                run = partial(self.process, inputs)
            batch.items = items
            results = await loop.run_in_executor(self._executor, run)
            if len(results) != len(items):
                raise RuntimeError(f"process returned {len(results)} results for {len(items)} inputs")
        except Exception as exc:
            error = exc
        compute_s = time.monotonic() - started
        ema = self._compute_ema_s
        self._compute_ema_s = compute_s if ema is None else 0.8 * ema + 0.2 * compute_s
        if error is not None:
            for item in batch.items:
                item.request.fail(error)
        else:
            self._deliver(batch.items, results)
        self._observe(len(batch.items), [started - item.enqueued_at for item in batch.items], compute_s)

    def _live(self, batch: list[QueuedItem[T, R]], now: float) -> list[QueuedItem[T, R]]:
        """Drop items of finished requests; expire requests past their deadline."""
        for item in batch:
            if now > item.request.deadline:
                item.request.fail(RequestTimeoutError("request expired in the batch queue"))
        return [item for item in batch if not item.request.future.done()]

    @staticmethod
    def _deliver(batch: list[QueuedItem[T, R]], results: list[R]) -> None:
        for item, result in zip(batch, results, strict=True):
            request = item.request
            if request.future.done():
                continue
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(list(request.results))

    def _observe(self, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        if self.observer is None:
            return
        try:
            self.observer.on_batch(self.name, size, queue_wait_s, compute_s)
        except Exception:
            logger.exception("batcher %s: observer failed", self.name)
