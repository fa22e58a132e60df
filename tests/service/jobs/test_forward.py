"""A fit job's forwards wait for the model's batcher: while a scoring batch is queued or computing, a chunk waits
(at most ``max_defer_s``, not at all once the job is stopping); chunks concatenate to the outputs of one plain
forward."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from service.demo import demo_model_configs
from service.engine.batcher import DynamicBatcher
from service.engine.served_model import ServedModel
from service.jobs.forward import ScoringFirstForward
from service.settings import load_settings


def digits_model() -> ServedModel:
    return ServedModel(demo_model_configs()[0], load_settings(device="cpu"))


def test_chunks_give_the_outputs_of_one_forward() -> None:
    model = digits_model()
    pixels = [torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8) for _ in range(10)]
    whole = model.forward(pixels)
    chunked = ScoringFirstForward(model, chunk=3)(pixels)
    assert set(chunked) == set(whole)
    for kind in whole:
        torch.testing.assert_close(chunked[kind], whole[kind], rtol=1e-5, atol=1e-5)


def test_a_chunk_waits_while_scoring_is_busy_and_not_longer_than_max_defer() -> None:
    model = digits_model()
    release = threading.Event()

    def process(items: list[int]) -> list[int]:
        release.wait(10)
        return items

    async def main() -> tuple[float, float]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(process, max_batch_size=1, max_wait_ms=0)
        await batcher.start()
        model.batcher = batcher  # type: ignore[assignment]
        pending = asyncio.ensure_future(batcher.submit([1, 2]))  # one computing, one queued
        await asyncio.sleep(0.05)
        forward = ScoringFirstForward(model, max_defer_s=10.0)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, release.set)
        await asyncio.to_thread(forward, [model.blank_pixels()])
        waited = time.monotonic() - started
        await pending
        release.clear()
        blocked = asyncio.ensure_future(batcher.submit([3]))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.to_thread(ScoringFirstForward(model, max_defer_s=0.2), [model.blank_pixels()])
        capped = time.monotonic() - started
        started = time.monotonic()
        await asyncio.to_thread(ScoringFirstForward(model, lambda: True, max_defer_s=30.0), [model.blank_pixels()])
        stopping = time.monotonic() - started
        assert stopping < 5.0  # a cancelled job does not wait its turn
        release.set()
        await blocked
        await batcher.stop()
        return waited, capped

    waited, capped = asyncio.run(asyncio.wait_for(main(), 30))
    assert waited >= 0.25  # it waited for the scoring batches
    assert 0.15 <= capped < 2.0  # under unbroken load it still runs after max_defer_s
