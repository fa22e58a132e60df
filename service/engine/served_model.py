"""A served model: network + feature extractor + preprocessing + active detectors + its batcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import torch
from torch import Tensor, nn

from service.engine.active import ActiveDetector
from service.engine.batcher import DynamicBatcher
from service.engine.items import ItemResult, ScoreItem
from service.engine.networks import LogitsOnly, build_extractor, build_heads, build_network
from service.engine.preprocess import Preprocessor
from service.settings import ModelConfig, Settings

OUTPUT_KINDS = ("logits", "features", "feature_maps")


class OutputOf(nn.Module):
    """``input -> one named output of the extractor`` (the ``backbone`` some detectors take)."""

    def __init__(self, extractor: nn.Module, kind: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x)[self.kind]


def pick_device(requested: str | None) -> torch.device:
    return torch.device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ServedModel:
    """Everything needed to score images with one network."""

    def __init__(self, config: ModelConfig, settings: Settings) -> None:
        self.config = config
        self.name = config.name
        self.task = config.task
        self.labels = config.class_labels
        self.device = pick_device(config.device or settings.device)
        self.autocast = bool(settings.autocast if config.autocast is None else config.autocast)
        self.max_batch_size = config.max_batch_size or settings.max_batch_size
        self.max_wait_ms = settings.max_wait_ms if config.max_wait_ms is None else config.max_wait_ms
        network = build_network(config)
        self.heads = {
            k: (h.to(self.device) if h is not None else None) for k, h in build_heads(network, config).items()
        }
        self.network = network.to(self.device)
        self.extractor = build_extractor(self.network, config).to(self.device)
        self.preprocessor = Preprocessor(config.preprocessing, config.input_size)
        self.detectors: dict[str, ActiveDetector] = {}
        """Active detectors; replaced as a whole (copy-on-write) on every change."""
        self.batcher: DynamicBatcher[ScoreItem, ItemResult] | None = None
        """Set by :func:`service.engine.submit.attach_batcher` when the service starts."""
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
        if not self.autocast:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self, pixels: list[Tensor]) -> dict[str, Tensor]:
        """One forward of ``uint8`` images (``C x H x W`` each) -> float32 outputs on the model's device."""
        batch = torch.stack(pixels)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        with torch.no_grad(), self._autocast():
            outputs = self.extractor(self.preprocessor.normalize(batch))
        return {kind: value.float() for kind, value in outputs.items()}

    def forward_chunks(self, pixels: list[Tensor], chunk: int = 256) -> dict[str, Tensor]:
        """:meth:`forward` in chunks, concatenated (for fitting on many images)."""
        parts = [self.forward(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)]
        return {kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]}
