"""Intra-op threads of the batch worker per batch size (``service/engine/threads.py``): one thread unless torch's
default is clearly faster for that size, the default unmeasured from the first long batch on, the plan applied per
batch in the worker thread and nowhere else."""

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
from tests.service.conftest import API_KEY, AppRunner, digit_png


@pytest.fixture
def worker() -> Iterator[ThreadPoolExecutor]:
    default = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown()
    threads.restore_default(default)


def batches_taking(
    seconds: Callable[[int, int], float], calls: list[tuple[int, int]] | None = None
) -> Callable[[int], None]:
    """``run_batch(size)`` sleeping ``seconds(size, threads)``."""

    def run(size: int) -> None:
        if calls is not None:
            calls.append((size, torch.get_num_threads()))
        time.sleep(seconds(size, torch.get_num_threads()))

    return run


def test_batch_sizes() -> None:
    assert threads.batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert threads.batch_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert threads.batch_sizes(1) == [1]


def test_small_batches_on_one_thread_large_ones_on_the_default(worker: ThreadPoolExecutor) -> None:
    # two threads: 1.1x faster at 1-4 images (not worth two cores), 2x faster from 8 on
    run = batches_taking(lambda size, n: 0.001 * size * (1.0 if n == 1 else (0.9 if size < 8 else 0.5)))
    plan = worker.submit(threads.plan_threads, run, [1, 2, 4, 8, 16], 2).result()
    assert plan.steps == [(1, 1), (8, 2)]
    assert [plan.threads_for(size) for size in (1, 3, 7, 8, 9, 16, 32)] == [1, 1, 1, 2, 2, 2, 2]
    assert set(plan.seconds) == {1, 2, 4, 8, 16} and plan.seconds[16][2] < plan.seconds[16][1]
    assert worker.submit(torch.get_num_threads).result() == 2  # left at the largest size's count


def test_one_thread_everywhere_for_a_near_tie(worker: ThreadPoolExecutor) -> None:
    run = batches_taking(lambda size, n: 0.001 * size * (1.0 if n == 1 else 0.9))
    plan = worker.submit(threads.plan_threads, run, [1, 2, 4], 2).result()
    assert plan.steps == [(1, 1)] and worker.submit(torch.get_num_threads).result() == 1


def test_from_the_first_long_batch_the_default_is_kept_unmeasured(worker: ThreadPoolExecutor) -> None:
    calls: list[tuple[int, int]] = []
    run = batches_taking(lambda size, n: 0.02 * size, calls)  # one thread as fast: 1 thread while measured
    plan = worker.submit(threads.plan_threads, run, [1, 2, 4, 8], 2, 1, 0.05, 0.0).result()
    assert plan.steps == [(1, 1), (4, 2)]
    assert [size for size, _ in calls].count(4) == 1 and 8 not in [size for size, _ in calls]
    assert plan.seconds[4] == {2: pytest.approx(0.08, abs=0.05)} and 8 not in plan.seconds


def test_apply_sets_the_count_per_batch_in_the_calling_thread_only(worker: ThreadPoolExecutor) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs a default of at least 2 intra-op threads")
    default = torch.get_num_threads()
    plan = threads.ThreadPlan([(1, 1), (8, default)])
    other = ThreadPoolExecutor(max_workers=1)
    try:
        assert other.submit(lambda: torch.ones(1000).sum() and torch.get_num_threads()).result() == default
        worker.submit(torch.get_num_threads).result()  # the worker's OpenMP set-up, as plan_threads does
        worker.submit(plan.apply, 2).result()
        assert worker.submit(torch.get_num_threads).result() == 1
        threads.restore_default(default)
        assert worker.submit(torch.get_num_threads).result() == 1
        worker.submit(plan.apply, 16).result()
        assert worker.submit(torch.get_num_threads).result() == default
        assert other.submit(torch.get_num_threads).result() == default
    finally:
        other.shutdown()


@pytest.mark.parametrize("configured", [0, 1])
def test_the_service_plans_its_batch_workers_threads(
    make_settings: Callable[..., Settings], configured: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.context")
    default = torch.get_num_threads()
    runner = AppRunner(make_settings(intra_op_threads=configured))
    try:
        logged = {
            r.__dict__["model"]: r.__dict__["threads_from_batch_size"]
            for r in caplog.records
            if r.getMessage() == "batch worker threads"
        }
        assert set(logged) == {"digits", "digits-seg"}
        context: ServiceContext = runner.app.state.context
        for model in context.catalog:
            assert model.thread_plan is not None and model.batcher is not None
            assert logged[model.name] == model.thread_plan.describe()
            if configured:
                assert model.thread_plan.steps == [(1, configured)]
            # a scored image runs on the plan's count for a batch of one
            assert (
                runner.post(
                    f"/v1/models/{model.name}/{'score' if model.task == 'classification' else 'segment'}",
                    files={"files": ("x.png", digit_png(0), "image/png")},
                    headers={"x-api-key": API_KEY},
                ).status_code
                == 200
            )
            in_worker = runner.call(model.batcher.run_in_worker(torch.get_num_threads))
            assert in_worker == model.thread_plan.threads_for(1)
        assert torch.get_num_threads() == default  # other threads keep torch's default
    finally:
        runner.close()
