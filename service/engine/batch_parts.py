"""The batcher's parts: its errors, its observer protocol, a waiting request, a queued item, a closed batch and the
one-task wake-up the batching and worker loops sleep on (:mod:`service.engine.batcher` runs them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
class Pending(Generic[T, R]):
    items: Sequence[T]
    deadline: float
    future: asyncio.Future[list[R]]
    results: list[Any] = field(default_factory=list)
    remaining: int = 0

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False)
class QueuedItem(Generic[T, R]):
    request: Pending[T, R]
    index: int
    enqueued_at: float


@dataclass(eq=False)
class ClosedBatch(Generic[T, R]):
    items: list[QueuedItem[T, R]]
    """Its live items (a request abandoned after the batch closed takes its items out)."""
    run: Callable[[], list[R]] | asyncio.Future[Callable[[], list[R]]]
    """What the worker calls for the items the batch closed with; a future while ``prepare`` runs."""
    closed_with: int = 0


class Wakeup:
    """Wakes ONE waiting task (the batching loop or the worker loop); both re-check their state after every
    wake-up, so a wake-up while nobody waits can be dropped."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def set(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, until: float | None = None) -> None:
        """Return when :meth:`set` is called or (``until`` not None) at ``until`` (monotonic seconds)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._future = future
        timer = None if until is None else loop.call_later(max(0.0, until - time.monotonic()), self.set)
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()
