"""The one way into the engine for a scoring request: check it, decode its images, submit them, get results.

A route calls, in this order: :func:`resolve` (the route fits the model's task, the threshold parameters are
valid, the requested detectors exist: resolved ONCE, so a later swap does not affect this request), then
:func:`decode_images`, then :func:`submit`; the results come back finished by the batch worker
(:func:`service.engine.scoring.process_batch`, wired to the model's batcher by :func:`attach_batcher`).

Decoding: a request whose images are small (:data:`INLINE_DECODE_BYTES` encoded, :data:`INLINE_DECODE_PIXELS` in
total from their headers, counting the decoded images and the model input they are resized to) is decoded on the
event loop, since a thread hop costs more than decoding a few thousand pixels (~0.1 ms per 32x32 PNG); larger ones
are decoded in the default thread pool so the event loop never blocks long, at most one request per CPU at a time
(:attr:`ServedModel.decode_slots`). Either way the pixel limit is checked from the header before decoding.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Protocol

from PIL import Image
from torch import Tensor

from service.engine.active import ActiveDetector
from service.engine.batcher import Arrival, BatchObserver, DynamicBatcher
from service.engine.decode import RawImage, load_image, open_image
from service.engine.items import ItemResult, ScoreItem
from service.engine.maps import MapFormat
from service.engine.scoring import ScoreObserver, prepare_batch, process_batch
from service.engine.served_model import ServedModel
from service.engine.verdicts import check_threshold_params
from service.errors import DetectorNotFoundError, WrongTaskError

INLINE_DECODE_PIXELS = 8192
"""Largest request (decoded pixels + model input pixels, over all its images) decoded on the event loop."""
INLINE_DECODE_BYTES = 64 * 1024
"""Largest body (encoded image bytes) whose headers are even read on the event loop; larger ones go to the pool."""

Decoded = list[tuple[Tensor, tuple[int, int]]]
"""Per image: ``uint8`` pixels at the model's input size and the original ``(height, width)``."""


class EngineObserver(BatchObserver, ScoreObserver, Protocol):
    """Batch and score metrics (:class:`service.metrics.ServiceMetrics`)."""


def attach_batcher(
    model: ServedModel, *, max_queue: int, timeout_s: float, observer: EngineObserver | None = None
) -> DynamicBatcher[ScoreItem, ItemResult]:
    """Give ``model`` its batcher, whose worker runs :func:`process_batch` (start it with ``await .start()``). On
    CUDA a batch closed while the worker is busy is staged on the device by :func:`prepare_batch` meanwhile; on the
    CPU staging is one ``torch.stack``, cheaper than the thread hop that would hide it."""
    model.batcher = DynamicBatcher(
        partial(process_batch, model, observer=observer),
        prepare=partial(prepare_batch, model, observer=observer) if model.device.type == "cuda" else None,
        max_batch_size=model.max_batch_size,
        max_wait_ms=model.max_wait_ms,
        max_queue=max_queue,
        timeout_s=timeout_s,
        name=model.name,
        observer=observer,
    )
    return model.batcher


def require_task(model: ServedModel, task: str, route: str) -> None:
    if model.task != task:
        other = "/segment" if model.task == "segmentation" else "/score"
        raise WrongTaskError(f"model {model.name!r} is a {model.task} model: {route} is for {task}; use {other}")


def resolve_detectors(model: ServedModel, names: list[str] | None) -> tuple[ActiveDetector, ...]:
    """The active detectors a request uses (``None``: all), resolved once."""
    active = model.detectors
    if names is None:
        return tuple(active[name] for name in sorted(active))
    unknown = [n for n in names if n not in active]
    if unknown:
        shown = ", ".join(repr(n[:64]) for n in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise DetectorNotFoundError(
            f"model {model.name!r} has no detector(s) {shown}; active: {', '.join(sorted(active)) or '(none)'}"
        )
    return tuple(active[name] for name in dict.fromkeys(names))


def resolve(
    model: ServedModel,
    task: str,
    route: str,
    names: list[str] | None,
    threshold: float | None,
    tpr: float | None,
) -> tuple[ActiveDetector, ...]:
    """Everything checked before the body is read: task, threshold parameters, detectors."""
    require_task(model, task, route)
    check_threshold_params(threshold, tpr)
    return resolve_detectors(model, names)


def _decode_all(model: ServedModel, raws: list[RawImage], opened: list[Image.Image] | None, max_pixels: int) -> Decoded:
    out = []
    for index, raw in enumerate(raws):
        image = load_image(opened[index] if opened is not None else open_image(raw, max_pixels), raw)
        out.append((model.preprocessor.pixels(image), (image.height, image.width)))
    return out


async def decode_images(model: ServedModel, raws: list[RawImage], max_pixels: int) -> Decoded:
    """Decode and preprocess every image (see the module docstring for where)."""
    opened = None
    if sum(len(raw.data) for raw in raws) <= INLINE_DECODE_BYTES:
        opened = [open_image(raw, max_pixels) for raw in raws]  # headers only
        height, width = model.config.input_size
        if sum(image.width * image.height + height * width for image in opened) <= INLINE_DECODE_PIXELS:
            return _decode_all(model, raws, opened, max_pixels)
    async with model.decode_slots:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _decode_all, model, raws, opened, max_pixels)


async def submit(
    model: ServedModel,
    decoded: Decoded,
    detectors: tuple[ActiveDetector, ...],
    threshold: float | None = None,
    tpr: float | None = None,
    map_format: MapFormat | None = None,
    map_sizes: list[tuple[int, int]] | None = None,
    arrival: Arrival | None = None,
) -> list[ItemResult]:
    """Submit the images to the model's batcher; finished results in request order. Segmentation: maps at
    ``map_sizes`` (default: the model's input size), encoded as ``map_format`` by the worker (``None``: tensors).
    ``arrival``: the request's announcement (:meth:`DynamicBatcher.arriving`), closed once its items are queued."""
    if model.batcher is None:
        raise RuntimeError(f"model {model.name!r} has no batcher: attach_batcher() was not called")
    if model.task != "segmentation":
        items = [ScoreItem(pixels, detectors, None, threshold, tpr) for pixels, _ in decoded]
    else:
        height, width = model.config.input_size
        sizes = map_sizes or [(height, width)] * len(decoded)
        items = [
            ScoreItem(pixels, detectors, (int(size[0]), int(size[1])), threshold, tpr, map_format=map_format)
            for (pixels, _), size in zip(decoded, sizes, strict=True)
        ]
    return await model.batcher.submit(items, arrival=arrival)
