"""Dynamic batching: collect items (images) from concurrent requests into one call of the model.

One small asyncio class in the spirit of LitServe's ``collate_requests`` and infinity's bounded queues with load
shedding:

* the queue is bounded in ITEMS, not requests; admission is all-or-nothing per request: a request whose items do
  not fit in the free capacity is refused at once with :class:`QueueFullError` (HTTP 429 + ``Retry-After``);
* a batch starts with the oldest waiting item and closes when it holds ``max_batch_size`` items or when
  ``max_wait_ms`` have passed since that first item entered the queue (the window is never restarted by later
  arrivals; if the first item already waited that long while the worker was busy, the batch closes at once with
  whatever is queued, so batching never adds more than ``max_wait_ms`` to the oldest item's latency);
* a request of many items is split across batches; its future resolves when all its items are done, with results
  in request order;
* ``process`` runs in ONE worker thread, off the event loop: the model sees one batch at a time, mixing items of
  several requests;
* failures are isolated per batch: an exception in ``process`` fails exactly the requests with items in that
  batch; a request past its deadline gets :class:`RequestTimeoutError` (504); a cancelled request (client gone) has
  its remaining items skipped; ``stop(drain=True)`` refuses new work and finishes everything accepted,
  ``stop(drain=False)`` fails what is still queued with :class:`BatcherClosedError`. Every accepted item ends in a
  result or an exception, never silence.

Per request the event loop does little: one future, one timer handle for the deadline (no ``asyncio.wait`` /
``wait_for``, which wrap every wait in a task), and the batching loop sleeps on one plain future that ``submit``
resolves; everything per image that can be vectorized (verdicts, p-values) happens in ``process``, per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class BatcherError(Exception):
    """Base class of the errors a :class:`DynamicBatcher` raises to a submitter."""


class QueueFullError(BatcherError):
    """The request's items do not fit in the free queue capacity (map to 429 with ``Retry-After``)."""

    def __init__(self, retry_after_s: float, message: str = "batch queue is full") -> None:
        super().__init__(f"{message}; retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class RequestTimeoutError(BatcherError):
    """The request was not fully processed before its deadline (map to 504)."""


class BatcherClosedError(BatcherError):
    """The batcher is not running or is shutting down (map to 503 with ``Retry-After``)."""

    def __init__(self, message: str = "batcher is not accepting work", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatchObserver(Protocol):
    """Receives one call per processed batch (e.g. to feed Prometheus histograms)."""

    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None: ...


@dataclass(eq=False)
class _Request(Generic[T, R]):
    items: Sequence[T]
    deadline: float
    future: asyncio.Future[list[R]]
    results: list[Any] = field(default_factory=list)
    remaining: int = 0

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False)
class _Item(Generic[T, R]):
    request: _Request[T, R]
    index: int
    enqueued_at: float


class DynamicBatcher(Generic[T, R]):
    """Batch items of concurrent :meth:`submit` calls into calls of ``process(list[T]) -> list[R]``.

    ``process`` must return exactly one result per input, in order. ``timeout_s`` is the default per-request
    deadline, counted from admission. Times are ``time.monotonic()`` seconds.
    """

    def __init__(
        self,
        process: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float = 30.0,
        name: str = "",
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        if max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError(f"need max_wait_ms >= 0 and timeout_s > 0, got {max_wait_ms}, {timeout_s}")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.name = name
        self.observer = observer
        self._queue: deque[_Item[T, R]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        """Set while the batching loop waits for work; :meth:`_wake` resolves it."""
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._in_flight = 0
        self._compute_ema_s: float | None = None

    # ------------------------------------------------------------------ state
    @property
    def queue_depth(self) -> int:
        """Items admitted and waiting for a batch (not counting the batch being computed)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items in the batch being formed or computed."""
        return self._in_flight

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (admission open)."""
        return self._task is not None and not self._closing

    def retry_after_s(self, extra_items: int = 0) -> float:
        """Estimated seconds until the queue has drained enough for ``extra_items`` more (at least 0.1 s)."""
        per_batch = self._compute_ema_s if self._compute_ema_s is not None else self.max_wait_s
        batches = (len(self._queue) + self._in_flight + extra_items) / self.max_batch_size
        return max(0.1, batches * max(per_batch, self.max_wait_s))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the batching loop and its worker thread (idempotent)."""
        if self._task is not None:
            return
        self._closing = False
        self._waiter = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{self.name or 'model'}")
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, drain: bool = True) -> None:
        """Close admission; finish every accepted item (``drain``) or fail the queued ones, then stop the loop."""
        self._closing = True
        if not drain:
            closed = BatcherClosedError("batcher stopped before this request was processed")
            while self._queue:
                self._queue.popleft().request.fail(closed)
        self._wake()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ submission
    async def submit(self, items: Sequence[T], timeout_s: float | None = None) -> list[R]:
        """Process ``items`` (possibly across several batches) and return their results in order.

        Raises :class:`QueueFullError` at once when the items do not fit, :class:`RequestTimeoutError` when the
        deadline passes, :class:`BatcherClosedError` when not running, or whatever ``process`` raised for a batch
        holding one of these items.
        """
        if self._task is None or self._closing:
            raise BatcherClosedError()
        if not items:
            return []
        free = self.max_queue - len(self._queue)
        if len(items) > free:
            raise QueueFullError(self.retry_after_s(len(items) - free))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request: _Request[T, R] = _Request(
            items=items,
            deadline=now + timeout,
            future=loop.create_future(),
            results=[None] * len(items),
            remaining=len(items),
        )
        self._queue.extend(_Item(request, i, now) for i in range(len(items)))
        self._wake()
        # one timer handle per request (cheaper than asyncio.wait/wait_for, which wrap the wait in a task)
        expiry = loop.call_later(timeout, self._expire, request, timeout)
        try:
            return await request.future  # a cancelled caller cancels the future too
        except asyncio.CancelledError:
            self._abandon(request, None)
            raise
        finally:
            expiry.cancel()

    def _expire(self, request: _Request[T, R], timeout: float) -> None:
        if not request.future.done():
            self._abandon(request, RequestTimeoutError(f"request not processed within {timeout:.3f} s"))

    def _abandon(self, request: _Request[T, R], error: BaseException | None) -> None:
        """Drop the request's queued items; fail its future with ``error`` or cancel it."""
        if error is not None:
            request.fail(error)
        elif not request.future.done():
            request.future.cancel()
        self._queue = deque(item for item in self._queue if item.request is not request)

    # ------------------------------------------------------------------ batching loop
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_for_work(self, until: float | None) -> None:
        """Return when :meth:`_wake` is called or (``until`` not None) at ``until`` (monotonic seconds)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = None if until is None else loop.call_later(max(0.0, until - time.monotonic()), self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _next_item(self, until: float | None) -> _Item[T, R] | None:
        """Pop the oldest live item; wait for one until ``until`` (forever if None). None on timeout/closing."""
        while True:
            while self._queue:
                item = self._queue.popleft()
                if not item.request.future.done():
                    return item
            if self._closing:
                return None
            if until is not None and until - time.monotonic() <= 0:
                return None
            await self._wait_for_work(until)

    async def _collect(self) -> list[_Item[T, R]] | None:
        """Form one batch; None once closing and nothing is left."""
        first = await self._next_item(None)
        if first is None:
            return None
        batch = [first]
        self._in_flight = 1
        window_end = first.enqueued_at + self.max_wait_s
        while len(batch) < self.max_batch_size:
            item = await self._next_item(window_end)
            if item is None:
                break
            batch.append(item)
            self._in_flight = len(batch)
        return batch

    def _live(self, batch: list[_Item[T, R]], now: float) -> list[_Item[T, R]]:
        """Drop items of finished requests; expire requests past their deadline."""
        for item in batch:
            if now > item.request.deadline:
                item.request.fail(RequestTimeoutError("request expired in the batch queue"))
        return [item for item in batch if not item.request.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Item[T, R]] | None = None
        try:
            while (batch := await self._collect()) is not None:
                try:
                    await self._process(loop, batch)
                except Exception as error:  # never let the loop die: fail the batch instead
                    logger.exception("batcher %s: unexpected error", self.name)
                    for item in batch:
                        item.request.fail(error)
                finally:
                    self._in_flight = 0
        finally:  # only non-empty if the loop task itself was cancelled: still answer everyone
            closed = BatcherClosedError("batcher stopped before this request was processed")
            for item in [*(batch or []), *self._queue]:
                item.request.fail(closed)
            self._queue.clear()

    async def _process(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[T, R]]) -> None:
        started = time.monotonic()
        batch = self._live(batch, started)
        if not batch:
            return
        inputs = [item.request.items[item.index] for item in batch]
        error: Exception | None = None
        results: list[R] = []
        try:
            results = await loop.run_in_executor(self._executor, self.process, inputs)
            if len(results) != len(inputs):
                raise RuntimeError(f"process returned {len(results)} results for {len(inputs)} inputs")
        except Exception as exc:
            error = exc
        compute_s = time.monotonic() - started
        ema = self._compute_ema_s
        self._compute_ema_s = compute_s if ema is None else 0.8 * ema + 0.2 * compute_s
        if error is not None:
            for item in batch:
                item.request.fail(error)
        else:
            self._deliver(batch, results)
        self._observe(len(batch), [started - item.enqueued_at for item in batch], compute_s)

    @staticmethod
    def _deliver(batch: list[_Item[T, R]], results: list[R]) -> None:
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
