"""A job's event history for its Server-Sent Events stream: ``progress`` events while it is queued or running, then
one ``job`` event with the final job. The worker thread publishes; subscribers on the event loop read every event
after the last one they saw (numbered from 1, the SSE ``id``, so a reconnecting client sends ``Last-Event-ID``).
The history keeps the last :data:`HISTORY` events: a slow or late reader skips older progress, never the end.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass

HISTORY = 1000


@dataclass(frozen=True)
class JobEvent:
    seq: int
    kind: str
    """``progress`` or ``job`` (the last one)."""
    data: str
    """The job as JSON."""


class JobEvents:
    """Thread-safe publisher, asyncio subscribers."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._events: deque[JobEvent] = deque(maxlen=HISTORY)
        self._seq = 0
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, kind: str, data: str, last: bool = False) -> None:
        """Append an event (from any thread); ``last``: the stream ends after it."""
        with self._lock:
            if self._closed:
                return
            self._seq += 1
            self._events.append(JobEvent(self._seq, kind, data))
            self._closed = last
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop closed meanwhile: nobody is listening
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    def after(self, seq: int) -> tuple[list[JobEvent], bool]:
        """Events numbered above ``seq`` and whether the stream has ended."""
        with self._lock:
            return [e for e in self._events if e.seq > seq], self._closed

    async def stream(self, after: int = 0, keepalive_s: float = 15.0) -> AsyncIterator[JobEvent | None]:
        """Every event after ``after`` as it comes, until the last; ``None`` when ``keepalive_s`` passed quietly."""
        seen = after
        while True:
            wakeup = self._wakeup
            events, closed = self.after(seen)
            for event in events:
                seen = event.seq
                yield event
            if closed:
                return
            try:
                await asyncio.wait_for(wakeup.wait(), keepalive_s)
            except TimeoutError:
                yield None
