"""Shared by the batcher tests: a recording ``process``, an observer spy, and small scenario helpers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.engine.batcher import DynamicBatcher


class Recorder:
    """A `process` function that doubles numbers, records every batch and can hold the worker on a gate."""

    def __init__(self, hold_first: bool = False, fail_on: object = None) -> None:
        self.batches: list[list[Any]] = []
        self.called_at: list[float] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items: list[Any]) -> list[Any]:
        self.called_at.append(time.monotonic())
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(20), "test never released the worker"
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on!r}")
        return [item * 2 for item in items]

    @property
    def seen(self) -> list[Any]:
        return [item for batch in self.batches for item in batch]


class ObserverSpy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[float], float]] = []

    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        self.calls.append((name, size, queue_wait_s, compute_s))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def started(process: Recorder, **kwargs: Any) -> DynamicBatcher[Any, Any]:
    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(process, **kwargs)
    await batcher.start()
    return batcher


async def worker_busy(process: Recorder) -> None:
    """Wait until the worker thread is inside `process` (holding the gate)."""
    assert await asyncio.to_thread(process.entered.wait, 20)


async def settle() -> None:
    """Let submit() tasks created just before run up to their first await (enqueued)."""
    for _ in range(5):
        await asyncio.sleep(0)
