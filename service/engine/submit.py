"""Request -> batcher -> results: what /score and /segment share.

Decoding: a request whose images are small (:data:`INLINE_DECODE_BYTES` encoded, :data:`INLINE_DECODE_PIXELS` in
total from their headers, counting the decoded images and the model input they are resized to) is decoded on the
event loop, since a thread hop costs more than decoding a few thousand pixels (~0.1 ms per 32x32 PNG); larger ones
are decoded in the thread pool so the event loop never blocks long, at most one request per CPU at a time
(:attr:`ServedModel.decode_slots`). Either way the pixel limit is checked from the header before decoding.
"""

from __future__ import annotations

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from service.context import ServiceContext
from service.errors import DetectorNotFoundError, WrongTaskError
from service.images import RawImage, load_image, open_image, read_body
from service.runtime import ActiveDetector, ServedModel
from service.scoring import ItemResult, ScoreItem


def require_task(model: ServedModel, task: str, route: str) -> None:
    if model.task != task:
        other = "/segment" if model.task == "segmentation" else "/score"
        raise WrongTaskError(f"model {model.name!r} is a {model.task} model: {route} is for {task}; use {other}")


def resolve_detectors(model: ServedModel, names: list[str] | None) -> tuple[ActiveDetector, ...]:
    """The active detectors a request uses, resolved ONCE (a later swap does not affect this request)."""
    active = model.detectors
    if names is None:
        return tuple(active[name] for name in sorted(active))
    unknown = [n for n in names if n not in active]
    if unknown:
        raise DetectorNotFoundError(
            f"model {model.name!r} has no detector(s) {', '.join(unknown)}; active: {', '.join(sorted(active)) or '(none)'}"
        )
    return tuple(active[name] for name in dict.fromkeys(names))


INLINE_DECODE_PIXELS = 8192
"""Largest request (decoded pixels + model input pixels, over all its images) decoded on the event loop."""
INLINE_DECODE_BYTES = 64 * 1024
"""Largest body (encoded image bytes) whose headers are even read on the event loop; larger ones go to the pool."""

Decoded = list[tuple[Tensor, tuple[int, int]]]


def _decode_all(model: ServedModel, raws: list[RawImage], opened: list[Image.Image] | None, max_pixels: int) -> Decoded:
    out = []
    for index, raw in enumerate(raws):
        image = load_image(opened[index] if opened is not None else open_image(raw, max_pixels), raw)
        out.append((model.preprocessor.pixels(image), (image.height, image.width)))
    return out


async def decode_request(context: ServiceContext, model: ServedModel, request: Request) -> Decoded:
    """Read the body and decode every image: ``(uint8 pixels, original (h, w))`` (see the module docstring)."""
    body = await read_body(request, context.settings.max_images_per_request)
    raws, max_pixels = body.images, context.settings.max_pixels
    opened = None
    if sum(len(raw.data) for raw in raws) <= INLINE_DECODE_BYTES:
        opened = [open_image(raw, max_pixels) for raw in raws]  # headers only
        height, width = model.config.input_size
        if sum(image.width * image.height + height * width for image in opened) <= INLINE_DECODE_PIXELS:
            return _decode_all(model, raws, opened, max_pixels)
    async with model.decode_slots:
        return await run_in_threadpool(_decode_all, model, raws, opened, max_pixels)


async def run_items(
    context: ServiceContext,
    model: ServedModel,
    decoded: Decoded,
    detectors: tuple[ActiveDetector, ...],
    with_maps: bool,
    threshold: float | None = None,
    tpr: float | None = None,
) -> list[ItemResult]:
    """Submit the images to the model's batcher; results in request order."""
    items = [ScoreItem(pixels, detectors, size if with_maps else None, threshold, tpr) for pixels, size in decoded]
    results: list[ItemResult] = await model.batcher.submit(items)
    context.metrics.images.labels(model.name, "segment" if with_maps else "score").inc(len(items))
    return results
