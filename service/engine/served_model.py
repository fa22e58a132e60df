"""A served model: network + feature extractor + preprocessing + active detectors + its batcher.

The forward of a batch has two steps, so the batcher can overlap them across batches: :meth:`ServedModel.stage`
(stack the images, on CUDA copy them from pinned memory on a side stream: :mod:`service.engine.devices`) and
:meth:`ServedModel.forward_staged` (normalize, run the extractor in ``channels_last`` and reduced precision as
configured, return float32 outputs in the standard layout, padded rows dropped). :meth:`ServedModel.forward` does
both. With ``compile`` the extractor is ``torch.compile``-d (dynamic batch size) and run on every batch size it
will see before the constructor returns, so compilation (and cuDNN autotuning) never happens on a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from service.engine.active import ActiveDetector
from service.engine.batcher import DynamicBatcher
from service.engine.devices import Staged, Stager, autocast_dtype, batch_buckets, configure_cudnn, pick_device
from service.engine.items import ItemResult, ScoreItem
from service.engine.networks import (
    GraphOutput,
    LogitsOnly,
    TappedLogits,
    build_extractor,
    build_heads,
    build_network,
    layer_keys,
)
from service.engine.preprocess import Preprocessor
from service.engine.threads import ThreadPlan
from service.settings import ModelConfig, Settings

OUTPUT_KINDS = ("logits", "features", "feature_maps")
logger = logging.getLogger(__name__)


class OutputOf(nn.Module):
    """``input -> one named output of the extractor`` (the ``backbone`` some detectors take)."""

    def __init__(self, extractor: nn.Module, kind: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x)[self.kind]


class ServedModel:
    """Everything needed to score images with one network."""

    def __init__(self, config: ModelConfig, settings: Settings) -> None:
        self.config = config
        self.name = config.name
        self.task = config.task
        self.labels = config.class_labels
        self.device = pick_device(config.device or settings.device)
        self.autocast_dtype = autocast_dtype(
            settings.autocast if config.autocast is None else config.autocast, self.device
        )
        self.autocast = self.autocast_dtype is not None
        self.channels_last = settings.channels_last if config.channels_last is None else config.channels_last
        self.max_batch_size = config.max_batch_size or settings.max_batch_size
        self.max_wait_ms = settings.max_wait_ms if config.max_wait_ms is None else config.max_wait_ms
        configure_cudnn(self.device, settings.cudnn_benchmark)
        network = build_network(config)
        self.heads = {
            k: (h.to(self.device) if h is not None else None) for k, h in build_heads(network, config).items()
        }
        self.network = network.to(self.device)
        self.extractor = build_extractor(self.network, config).to(self.device)
        if self.channels_last:  # 4-D weights only; other parameters keep their layout
            self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self._run: Callable[..., Any] = self.extractor
        """What the forward calls: the extractor, or its compiled version."""
        compiled = settings.compile if config.compile is None else config.compile
        padded = compiled or (self.device.type == "cuda" and settings.cudnn_benchmark)
        self.stager = Stager(self.device, batch_buckets(self.max_batch_size) if padded else None, self.channels_last)
        self.preprocessor = Preprocessor(config.preprocessing, config.input_size)
        self.detectors: dict[str, ActiveDetector] = {}
        """Active detectors; replaced as a whole (copy-on-write) on every change."""
        self.batcher: DynamicBatcher[ScoreItem, ItemResult] | None = None
        """Set by :func:`service.engine.submit.attach_batcher` when the service starts."""
        self.thread_plan: ThreadPlan | None = None
        """CPU: the batch worker's intra-op threads per batch size (:mod:`service.engine.threads`), set at warm-up."""
        self.decode_slots = asyncio.Semaphore(os.cpu_count() or 1)
        """Requests of this model decoding in the thread pool at once: one per CPU (the pool allows 40 threads, which
        on a small CPU oversubscribes the cores the forward needs; decoders release the GIL, so more gain nothing)."""
        self.probe: dict[str, Tensor] = self.forward([self.blank_pixels()] * 2)
        self.dims = {kind: int(t.shape[1]) for kind, t in self.probe.items()}
        if self.dims["logits"] != config.num_classes:
            raise ValueError(
                f"model {self.name!r}: logits node gives {self.dims['logits']} classes, config says "
                f"{config.num_classes}"
            )
        if compiled:
            self._run = torch.compile(self.extractor, dynamic=True)
        self.warm_up()

    def warm_sizes(self) -> tuple[int, ...]:
        """Batch sizes run once at start: every padded size when batches are padded (compiled, or CUDA with cuDNN
        autotuning: a compiled graph is guarded on size ranges and cuDNN tunes per shape), else none."""
        return self.stager.buckets or ()

    def warm_up(self) -> None:
        """Run every batch size of :meth:`warm_sizes` (compiles and autotunes before the first request)."""
        started = time.perf_counter()
        sizes = self.warm_sizes()
        for size in sizes:  # in inference mode, like the batch worker: a compiled graph is guarded on it
            with torch.inference_mode():
                self.forward_staged(self.stage([self.blank_pixels()] * size))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if sizes:
            logger.info(
                "model warmed up",
                extra={"model": self.name, "sizes": list(sizes), "seconds": round(time.perf_counter() - started, 3)},
            )

    def blank_pixels(self) -> Tensor:
        height, width = self.config.input_size
        return torch.zeros(self.preprocessor.channels, height, width, dtype=torch.uint8)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.probe)

    def networks(self) -> dict[str, dict[str, nn.Module | None]]:
        """The networks a detector of each input kind is given: ``model`` (input -> logits), ``head``
        (that output -> logits) and ``backbone`` (input -> that output)."""
        logits = LogitsOnly(self.extractor)
        return {
            kind: {
                "model": logits,
                "head": self.heads.get(kind),
                "backbone": OutputOf(self.extractor, kind),
            }
            for kind in OUTPUT_KINDS
        }

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def stage(self, pixels: list[Tensor]) -> Staged:
        """Step 1 of a forward (any thread): the ``uint8`` images (``C x H x W`` each) as one batch on the device."""
        return self.stager.stage(pixels)

    def forward_staged(self, staged: Staged) -> dict[str, Tensor]:
        """Step 2 (the batch worker): float32 outputs on the model's device, contiguous, one row per real image.
        Call it under ``torch.no_grad()`` or ``torch.inference_mode()``."""
        x = self.preprocessor.normalize(self.stager.ready(staged))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            outputs = self._run(x)
        rows = staged.rows
        return {
            kind: (value if len(value) == rows else value[:rows]).float().contiguous()
            for kind, value in outputs.items()
        }

    def loop_inputs(self, staged: Staged) -> Tensor:
        """The batch's preprocessed inputs (float32, contiguous, one row per real image) for the detectors that run
        the network themselves (``input_kind = "input"``, :mod:`service.engine.scoring`)."""
        return self.preprocessor.normalize(self.stager.ready(staged)[: staged.rows]).contiguous()

    def loop_networks(self) -> dict[str, nn.Module]:
        """What those detectors run, eager and in float32, sharing the extractor's parameters (built once):
        ``logits`` and ``features`` (:class:`~service.engine.networks.GraphOutput`) and ``layers``
        (:class:`~service.engine.networks.TappedLogits` over the ``nodes.layers`` outputs)."""
        built: dict[str, nn.Module] | None = getattr(self, "_loop_networks", None)
        if built is None:
            built = {kind: GraphOutput(self.extractor, kind) for kind in ("logits", "features") if kind in self.probe}
            built["layers"] = TappedLogits(self.extractor, layer_keys(self.config))
            self._loop_networks = built
        return built

    def forward(self, pixels: list[Tensor]) -> dict[str, Tensor]:
        """One forward of ``uint8`` images (``C x H x W`` each) -> float32 outputs on the model's device."""
        with torch.no_grad():
            return self.forward_staged(self.stage(pixels))

    def forward_chunks(self, pixels: list[Tensor], chunk: int = 256) -> dict[str, Tensor]:
        """:meth:`forward` in chunks, concatenated (for fitting on many images)."""
        parts = [self.forward(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)]
        return {kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]}
