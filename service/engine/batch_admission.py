"""The admission side of :class:`~service.engine.batcher.DynamicBatcher`: the bounded queue of items, all-or-nothing
admission per request, deadlines, cancellation, and the announcements of requests on their way
(:class:`Arrival`). The batching policy and the worker loops are :mod:`service.engine.batcher`'s."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from service.engine.batch_parts import (
    BatcherClosedError,
    ClosedBatch,
    Pending,
    QueuedItem,
    QueueFullError,
    RequestTimeoutError,
    Wakeup,
)

T = TypeVar("T")
R = TypeVar("R")


class Arrival:
    """A request on its way to :meth:`DynamicBatcher.submit` (a context manager; :meth:`close` when it submitted or
    gave up)."""

    __slots__ = ("_batcher", "_open")

    def __init__(self, batcher: BatchQueue[Any, Any]) -> None:
        self._batcher = batcher
        self._open = True
        batcher._arriving += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arriving -= 1
            self._batcher._notify()

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchQueue(Generic[T, R]):
    """Queued items of admitted requests, closed into batches by a subclass (:class:`DynamicBatcher`)."""

    def __init__(self, max_batch_size: int, max_wait_ms: float, max_queue: int, timeout_s: float, name: str) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        if max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError(f"need max_wait_ms >= 0 and timeout_s > 0, got {max_wait_ms}, {timeout_s}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.name = name
        self._queue: deque[QueuedItem[T, R]] = deque()
        self._next: ClosedBatch[T, R] | None = None
        """The batch closed and waiting for the worker (at most one)."""
        self._running: list[QueuedItem[T, R]] = []
        """Items of the batch the worker computes."""
        self._wakeup = Wakeup()
        """The batching loop's: new items, a free worker, closing."""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._compute_ema_s: float | None = None
        self._arriving = 0
        """Announced requests not yet submitted (:meth:`arriving`)."""

    @property
    def queue_depth(self) -> int:
        """Items admitted and not yet computing: queued, or in the closed batch waiting for the worker."""
        return len(self._queue) + (len(self._next.items) if self._next is not None else 0)

    @property
    def in_flight(self) -> int:
        """Items in the batch the worker computes."""
        return len(self._running)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (admission open)."""
        return self._task is not None and not self._closing

    @property
    def busy(self) -> bool:
        """True while the worker computes a batch."""
        return bool(self._running)

    def retry_after_s(self, extra_items: int = 0) -> float:
        """Estimated seconds until the queue has drained enough for ``extra_items`` more (at least 0.1 s)."""
        per_batch = self._compute_ema_s if self._compute_ema_s is not None else self.max_wait_s
        batches = (self.queue_depth + self.in_flight + extra_items) / self.max_batch_size
        return max(0.1, batches * max(per_batch, self.max_wait_s))

    def _fail_waiting(self, error: BaseException) -> None:
        while self._queue:
            self._queue.popleft().request.fail(error)
        if self._next is not None:
            for item in self._next.items:
                item.request.fail(error)

    def arriving(self) -> Arrival:
        """Announce a request that will :meth:`submit` soon (``with batcher.arriving() as arrival: ...
        submit(items, arrival=arrival)``): an idle worker waits briefly for it instead of starting a batch
        without it (see the module docstring)."""
        return Arrival(self)

    async def submit(
        self, items: Sequence[T], timeout_s: float | None = None, arrival: Arrival | None = None
    ) -> list[R]:
        """Process ``items`` (possibly across several batches) and return their results in order.

        Raises :class:`QueueFullError` at once when the items do not fit, :class:`RequestTimeoutError` when the
        deadline passes, :class:`BatcherClosedError` when not running, or whatever ``process`` raised for a batch
        holding one of these items.
        """
        if arrival is not None:
            arrival.close()
        if self._task is None or self._closing:
            raise BatcherClosedError()
        if not items:
            return []
        free = self.max_queue - self.queue_depth
        if len(items) > free:
            raise QueueFullError(self.retry_after_s(len(items) - free))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request: Pending[T, R] = Pending(
            items=items,
            deadline=now + timeout,
            future=loop.create_future(),
            results=[None] * len(items),
            remaining=len(items),
        )
        self._queue.extend(QueuedItem(request, i, now) for i in range(len(items)))
        self._notify()
        # one timer handle per request (cheaper than asyncio.wait/wait_for, which wrap the wait in a task)
        expiry = loop.call_later(timeout, self._expire, request, timeout)
        try:
            return await request.future  # a cancelled caller cancels the future too
        except asyncio.CancelledError:
            self._abandon(request, None)
            raise
        finally:
            expiry.cancel()

    def _expire(self, request: Pending[T, R], timeout: float) -> None:
        if not request.future.done():
            self._abandon(request, RequestTimeoutError(f"request not processed within {timeout:.3f} s"))

    def _abandon(self, request: Pending[T, R], error: BaseException | None) -> None:
        """Drop the request's queued items; fail its future with ``error`` or cancel it."""
        if error is not None:
            request.fail(error)
        elif not request.future.done():
            request.future.cancel()
        self._queue = deque(item for item in self._queue if item.request is not request)
        waiting = self._next
        if waiting is not None and any(item.request is request for item in waiting.items):
            waiting.items = [item for item in waiting.items if item.request is not request]

    def _notify(self) -> None:
        """Wake the batching loop for new or announced work, unless it could only go back to sleep: while the
        worker computes, arrivals accumulate until it frees (which wakes the loop) or a batch is full (one task
        wake-up less per request under load)."""
        if self._next is None and (not self._running or len(self._queue) >= self.max_batch_size):
            self._wakeup.set()
