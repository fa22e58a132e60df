"""The running service: models, their batchers and detectors, the state store, keys and metrics.

Start-up (:meth:`ServiceContext.start`) runs in the background so that the server answers ``/healthz`` at once:
it builds the models, loads the stored detector states (fitting the demo's on first start), starts one batcher
per model and warms each up with a full batch; only then is the service ready (``/readyz``). Then, every
``state_sync_s`` seconds, it syncs the served detectors with the state directory that other replicas write too
(:mod:`service.sync`). Shutdown stops the sync and drains the batchers, so every accepted request is answered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial

from service.auth import ApiKeys
from service.batcher import DynamicBatcher
from service.errors import ModelNotFoundError, NotReadyError
from service.metrics import ServiceMetrics
from service.registry import build_detector
from service.runtime import ActiveDetector, ServedModel
from service.scoring import ItemResult, ScoreItem, process_batch
from service.settings import ModelConfig, Settings
from service.store import StateStore, check_name
from service.sync import run_sync_loop

logger = logging.getLogger("service.context")
WARMUP_TIMEOUT_S = 300.0


class ServiceContext:
    """Shared by all routes (``app.state.context``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = StateStore(settings.state_dir)
        self.keys = ApiKeys.from_settings(settings)
        self.models: dict[str, ServedModel] = {}
        self.metrics = ServiceMetrics(lambda: list(self.models.values()))
        self.ready = False
        self.failure: str | None = None
        self.write_lock = threading.Lock()
        """Held by every change of a model's detectors: installs, deletes and the sync's swaps."""
        self._startup: asyncio.Task[None] | None = None
        self._sync: asyncio.Task[None] | None = None
        self._ready_event: asyncio.Event | None = None

    # ------------------------------------------------------------------ lookups
    def model(self, name: str) -> ServedModel:
        if not self.ready:
            raise NotReadyError(self.failure or "the service is warming up")
        check_name("model", name)
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(f"no model {name!r}; served: {', '.join(sorted(self.models)) or '(none)'}")
        return model

    # ------------------------------------------------------------------ detector writes
    def install(self, model: ServedModel, name: str, data: bytes) -> ActiveDetector:
        """Validate ``data`` against ``model``, store it, then swap it in (blocking: call in a thread)."""
        check_name("detector", name)
        detector = build_detector(model, data)  # raises before anything changes
        with self.write_lock:
            stored = self.store.put(model.name, name, data, type(detector).__name__)
            active = ActiveDetector(name=name, detector=detector, stored=stored)
            model.detectors = {**model.detectors, name: active}
        logger.info("detector installed", extra={"model": model.name, "detector": name, "version": stored.version})
        return active

    def remove(self, model: ServedModel, name: str) -> None:
        check_name("detector", name)
        with self.write_lock:
            self.store.delete(model.name, name)
            model.detectors = {k: v for k, v in model.detectors.items() if k != name}
        logger.info("detector deleted", extra={"model": model.name, "detector": name})

    # ------------------------------------------------------------------ lifecycle
    def model_configs(self) -> list[ModelConfig]:
        if self.settings.models:
            return list(self.settings.models)
        from service.demo import demo_model_configs

        return demo_model_configs()

    def _load_model(self, config: ModelConfig) -> ServedModel:
        started = time.perf_counter()
        model = ServedModel(config, self.settings)
        first_start = not (self.store.root / model.name).exists()
        for stored in self.store.list_states(model.name):
            try:
                _, data = self.store.read(model.name, stored.name)
                active = ActiveDetector(name=stored.name, detector=build_detector(model, data), stored=stored)
                model.detectors = {**model.detectors, stored.name: active}
            except Exception:
                logger.exception("cannot load stored state", extra={"model": model.name, "detector": stored.name})
        if not self.settings.models and first_start:  # a deleted demo detector stays deleted
            from service.demo import ensure_demo_detectors

            ensure_demo_detectors(self, model)
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

    def _batcher(self, model: ServedModel) -> DynamicBatcher[ScoreItem, ItemResult]:
        return DynamicBatcher(
            partial(process_batch, model),
            max_batch_size=model.max_batch_size,
            max_wait_ms=model.max_wait_ms,
            max_queue=self.settings.max_queue,
            timeout_s=self.settings.request_timeout_s,
            name=model.name,
            observer=self.metrics,
        )

    async def _start(self) -> None:
        try:
            for config in self.model_configs():
                model = await asyncio.to_thread(self._load_model, config)
                model.batcher = self._batcher(model)
                await model.batcher.start()
                self.models[model.name] = model
            for model in self.models.values():  # warm-up: one full batch through the real path
                blank = ScoreItem(model.blank_pixels(), tuple(model.detectors.values()), None)
                size = min(model.max_batch_size, self.settings.max_queue)
                await model.batcher.submit([blank] * size, timeout_s=WARMUP_TIMEOUT_S)
            self.ready = True
            logger.info("service ready", extra={"models": sorted(self.models)})
            if self.settings.state_sync_s > 0:
                self._sync = asyncio.create_task(run_sync_loop(self, self.settings.state_sync_s), name="ood-sync")
        except Exception as exc:
            self.failure = f"start-up failed: {type(exc).__name__}: {exc}"
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
        if not self.ready:
            raise RuntimeError(self.failure or "start-up did not finish")

    async def stop(self) -> None:
        """Refuse new work, finish every accepted request, stop the batch workers."""
        self.ready = False
        for task in (self._startup, self._sync):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for model in self.models.values():
            if model.batcher is not None:
                await model.batcher.stop(drain=True)
        logger.info("service stopped")
