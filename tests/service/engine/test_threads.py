"""Intra-op threads of the batch worker (``service/engine/threads.py``): the faster of the default and one thread
is kept, a long batch keeps the default unmeasured, and the choice stays in the worker thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.context import ServiceContext
from service.engine import threads
from service.settings import Settings
from tests.service.conftest import AppRunner


@pytest.fixture
def worker() -> Iterator[ThreadPoolExecutor]:
    default = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown()
    threads.restore_default(default)


def batch_taking(seconds_by_threads: Callable[[int], float]) -> Callable[[], None]:
    def run() -> None:
        time.sleep(seconds_by_threads(torch.get_num_threads()))

    return run


def test_one_thread_is_kept_when_it_is_faster(worker: ThreadPoolExecutor) -> None:
    run = batch_taking(lambda n: 0.002 if n == 1 else 0.012)
    choice = worker.submit(threads.pick_threads, run, 2).result()
    assert choice.threads == 1 and set(choice.seconds) == {1, 2}
    assert choice.seconds[1] < choice.seconds[2]
    assert worker.submit(torch.get_num_threads).result() == 1


def test_one_thread_is_kept_when_the_default_is_only_a_little_faster(worker: ThreadPoolExecutor) -> None:
    run = batch_taking(lambda n: 0.011 if n == 1 else 0.010)  # 1.1x for twice the cores
    assert worker.submit(threads.pick_threads, run, 2).result().threads == 1


def test_the_default_is_kept_when_it_is_much_faster(worker: ThreadPoolExecutor) -> None:
    run = batch_taking(lambda n: 0.012 if n == 1 else 0.002)
    choice = worker.submit(threads.pick_threads, run, 2).result()
    assert choice.threads == 2 and worker.submit(torch.get_num_threads).result() == 2


def test_a_long_batch_keeps_the_default_without_measuring(worker: ThreadPoolExecutor) -> None:
    calls: list[int] = []

    def run() -> None:
        calls.append(torch.get_num_threads())
        time.sleep(0.03)

    choice = worker.submit(threads.pick_threads, run, 2, 3, 0.01).result()
    assert choice.threads == 2 and calls == [2] and list(choice.seconds) == [2]


def test_the_choice_stays_in_the_worker_thread(worker: ThreadPoolExecutor) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs a default of at least 2 intra-op threads")
    default = torch.get_num_threads()
    other = ThreadPoolExecutor(max_workers=1)
    try:
        assert other.submit(lambda: torch.ones(1000).sum() and torch.get_num_threads()).result() == default
        worker.submit(threads.set_threads, 1).result()
        threads.restore_default(default)
        assert worker.submit(torch.get_num_threads).result() == 1
        assert other.submit(torch.get_num_threads).result() == default
    finally:
        other.shutdown()


@pytest.mark.parametrize("configured", [0, 1])
def test_the_service_sets_its_batch_workers_threads(
    make_settings: Callable[..., Settings], configured: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.context")
    default = torch.get_num_threads()
    runner = AppRunner(make_settings(intra_op_threads=configured))
    try:
        chosen = {
            r.__dict__["model"]: r.__dict__["threads"]
            for r in caplog.records
            if r.getMessage() == "batch worker threads"
        }
        assert set(chosen) == {"digits", "digits-seg"}
        context: ServiceContext = runner.app.state.context
        for model in context.catalog:
            assert model.batcher is not None
            in_worker = runner.call(model.batcher.run_in_worker(torch.get_num_threads))
            assert in_worker == chosen[model.name] == (configured or in_worker)
        assert torch.get_num_threads() == default  # other threads keep torch's default
    finally:
        runner.close()
