"""A fit job's forwards on the model's own device, between its scoring batches: scoring keeps priority.

The job's forward (:func:`service.fit.runner.run_fit`'s ``forward``) splits its batch into chunks of at most the
model's scoring batch size and, before each chunk, waits while the model's batcher has work (``queue_depth`` or
``in_flight`` above 0, its public state), so a scoring request never queues behind more than one such chunk. Under
unbroken scoring load a chunk still runs after ``max_defer_s`` of waiting, so a job progresses slowly rather than
never. The batcher's internals are not touched: it neither knows nor waits for the job.

The job's other work (reading and decoding its images, folding the outputs into the detector's statistics) runs
in the same thread between two forwards. While scoring is active (its batcher was seen busy within the last
:data:`ACTIVE_S`), each forward first sleeps ``yield_ratio`` times as long as that work took (at most
:data:`MAX_YIELD_S`): the job then holds at most ``1 / (1 + yield_ratio)`` of its thread's time, and with it of the
interpreter lock the request path needs too. (The job's thread also runs at the
lowest OS priority: :func:`service.jobs.manager.lower_thread_priority`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from service.engine.served_model import ServedModel

MAX_YIELD_S = 0.25
ACTIVE_S = 1.0


class ScoringFirstForward:
    """``forward(pixels) -> outputs`` for a fit job: chunks of ``chunk`` images, each after the scoring queue is
    empty (or after ``max_defer_s``); ``should_stop`` ends a wait at once (a cancel)."""

    def __init__(
        self,
        model: ServedModel,
        should_stop: Callable[[], bool] = lambda: False,
        chunk: int | None = None,
        max_defer_s: float = 1.0,
        poll_s: float = 0.002,
        yield_ratio: float = 1.0,
    ) -> None:
        self.model = model
        self.should_stop = should_stop
        self.chunk = max(1, chunk or model.max_batch_size)
        self.max_defer_s = max_defer_s
        self.poll_s = poll_s
        self.yield_ratio = yield_ratio
        self.deferred_s = 0.0
        """Seconds spent waiting for scoring so far."""
        self._returned: float | None = None
        self._busy_at = -ACTIVE_S

    def scoring_busy(self) -> bool:
        batcher = self.model.batcher
        busy = batcher is not None and (batcher.queue_depth > 0 or batcher.in_flight > 0)
        if busy:
            self._busy_at = time.monotonic()
        return busy

    def scoring_active(self) -> bool:
        """Busy now, or seen busy within the last :data:`ACTIVE_S`."""
        return self.scoring_busy() or time.monotonic() - self._busy_at < ACTIVE_S

    def wait_turn(self) -> None:
        """Return once the batcher is idle, ``max_defer_s`` passed, or the job is stopping."""
        started = time.monotonic()
        deadline = started + self.max_defer_s
        while self.scoring_busy() and not self.should_stop() and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        self.deferred_s += time.monotonic() - started

    def yield_to_scoring(self) -> None:
        """While scoring is active, sleep ``yield_ratio`` times the job's work since the last forward returned."""
        if self._returned is None or not self.scoring_active():
            return
        pause = min(MAX_YIELD_S, (time.monotonic() - self._returned) * self.yield_ratio)
        if pause > 0 and not self.should_stop():
            time.sleep(pause)
            self.deferred_s += pause

    def __call__(self, pixels: list[Tensor]) -> dict[str, Tensor]:
        self.yield_to_scoring()
        parts: list[dict[str, Tensor]] = []
        for start in range(0, len(pixels), self.chunk):
            self.wait_turn()
            parts.append(self.model.forward(pixels[start : start + self.chunk]))
        self._returned = time.monotonic()
        if len(parts) == 1:
            return parts[0]
        return {kind: torch.cat([part[kind] for part in parts]) for kind in parts[0]}
