"""The running service's lifecycle: start-up, replica sync and shutdown (the request path never sees it; routes
get :class:`service.api.deps.ApiServices`, made of this object's parts).

Start-up (:meth:`ServiceContext.start`) runs in the background so that the server answers ``/healthz`` at once:
it builds the models, loads the stored detector states (fitting the demo's on first start), gives each model its
batcher and warms it up with a full batch; only then is the service ready (``/readyz``). Then, every
``state_sync_s`` seconds, it syncs the served detectors with the state directory that other replicas write too
(:mod:`service.states.sync`). Fit jobs (:mod:`service.jobs`) left queued or running by a process that died are
marked "interrupted by a restart" at start-up. Shutdown stops the sync, ends the running and queued fit jobs (also
"interrupted by a restart") and drains the batchers, so every accepted request is answered.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from functools import partial

import torch

from service import demo
from service.engine import threads
from service.engine.catalog import ModelCatalog
from service.engine.items import ScoreItem
from service.engine.scoring import process_batch
from service.engine.served_model import ServedModel
from service.engine.submit import attach_batcher
from service.jobs.manager import JobManager
from service.metrics import ServiceMetrics
from service.settings import ModelConfig, Settings
from service.states.manager import StateManager
from service.states.sync import run_sync_loop

logger = logging.getLogger("service.context")
WARMUP_TIMEOUT_S = 300.0


def prepare_states(settings: Settings) -> None:
    """Before several worker processes start on one state directory (``OOD_WORKERS``): remove what interrupted
    writes left behind and, for the demo on its first start, fit and store its states once (each worker would
    otherwise fit them at the same time)."""
    context = ServiceContext(settings)
    context.states.store.cleanup().log()
    if not settings.models:
        for config in context.model_configs():
            context._load_model(config)


class ServiceContext:
    """Owns the models' start-up and shutdown; holds the parts the routes are given."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = ModelCatalog()
        self.states = StateManager(settings.state_dir, settings.state_keep)
        self.metrics = ServiceMetrics(self.catalog)
        self.jobs = JobManager(settings, self.catalog, self.states, observer=self.metrics)
        self.metrics.watch_jobs(self.jobs.active_counts)
        self._startup: asyncio.Task[None] | None = None
        self._sync: asyncio.Task[None] | None = None
        self._ready_event: asyncio.Event | None = None
        self._default_threads = torch.get_num_threads()

    def model_configs(self) -> list[ModelConfig]:
        return list(self.settings.models) if self.settings.models else demo.demo_model_configs()

    def _load_model(self, config: ModelConfig) -> ServedModel:
        started = time.perf_counter()
        model = ServedModel(config, self.settings)
        first_start = not (self.states.store.root / model.name).exists()
        self.states.load_stored(model)
        if not self.settings.models and first_start:  # a deleted demo detector stays deleted
            demo.ensure_demo_detectors(self.states, model)
        logger.info(
            "model loaded",
            extra={
                "model": model.name,
                "device": str(model.device),
                "detectors": sorted(model.detectors),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return model

    async def _worker_threads(self, model: ServedModel, blank: ScoreItem) -> None:
        """Intra-op threads of the model's batch worker per batch size: measured at warm-up or configured
        (:mod:`service.engine.threads`); the worker applies the plan to every batch."""
        assert model.batcher is not None
        configured = self.settings.intra_op_threads
        if configured > 0:
            plan = await model.batcher.run_in_worker(partial(threads.fixed_plan, configured))
        else:

            def run_batch(size: int) -> object:
                return process_batch(model, [blank] * size)

            sizes = threads.batch_sizes(min(model.max_batch_size, self.settings.max_queue))
            plan = await model.batcher.run_in_worker(
                partial(threads.plan_threads, run_batch, sizes, self._default_threads)
            )
        model.thread_plan = plan
        logger.info(
            "batch worker threads",
            extra={
                "model": model.name,
                "threads_from_batch_size": plan.describe(),
                "batch_ms": {
                    str(size): {str(k): round(v * 1000, 2) for k, v in times.items()}
                    for size, times in plan.seconds.items()
                },
            },
        )

    async def _start(self) -> None:
        catalog = self.catalog
        try:
            report = await asyncio.to_thread(self.states.store.cleanup)  # what interrupted writes left behind
            report.log()
            await asyncio.to_thread(self.jobs.recover)  # jobs a dead process left: failed, spools removed
            self.jobs.start(asyncio.get_running_loop())
            for config in self.model_configs():
                model = await asyncio.to_thread(self._load_model, config)
                batcher = attach_batcher(
                    model,
                    max_queue=self.settings.max_queue,
                    timeout_s=self.settings.request_timeout_s,
                    observer=self.metrics,
                )
                await batcher.start()
                catalog.models[model.name] = model
            for model in catalog:  # warm-up: one full batch through the real path, kept out of the score metrics
                blank = ScoreItem(model.blank_pixels(), tuple(model.detectors.values()), record=False)
                size = min(model.max_batch_size, self.settings.max_queue)
                assert model.batcher is not None
                await model.batcher.submit([blank] * size, timeout_s=WARMUP_TIMEOUT_S)
                if model.device.type == "cpu":
                    await self._worker_threads(model, blank)
            threads.restore_default(self._default_threads)  # threads started from now on: torch's default
            gc.collect()  # start-up's objects (torch, the models, the demo fit) leave the collector's view: the
            gc.freeze()  # full collections under load then walk only what requests allocate (p95 at c=64: 280 -> 127 ms)
            catalog.ready = True
            logger.info("service ready", extra={"models": sorted(catalog.models)})
            if self.settings.state_sync_s > 0:
                self._sync = asyncio.create_task(
                    run_sync_loop(self.states, catalog, self.settings.state_sync_s), name="ood-sync"
                )
        except Exception as exc:
            catalog.failure = f"start-up failed: {type(exc).__name__}: {exc}"
            logger.exception("start-up failed")
        finally:
            if self._ready_event is not None:
                self._ready_event.set()

    async def start(self) -> None:
        """Begin start-up in the background (returns at once)."""
        self._ready_event = asyncio.Event()
        self._startup = asyncio.create_task(self._start(), name="ood-startup")

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait for start-up to end; raise if it failed (for tests and the CLI)."""
        if self._ready_event is None:
            raise RuntimeError("start() was not called")
        await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        if not self.catalog.ready:
            raise RuntimeError(self.catalog.failure or "start-up did not finish")

    async def stop(self) -> None:
        """Refuse new work, finish every accepted request, stop the batch workers."""
        self.catalog.ready = False
        for task in (self._startup, self._sync):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.jobs.stop()  # queued and running fit jobs: failed, "interrupted by a restart"
        for model in self.catalog:
            if model.batcher is not None:
                await model.batcher.stop(drain=True)
        logger.info("service stopped")
