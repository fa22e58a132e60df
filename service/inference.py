"""Request -> batcher -> results: what /score and /segment share."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from service.context import ServiceContext
from service.errors import DetectorNotFoundError, WrongTaskError
from service.images import RawImage, decode_image, read_body
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


def _decode_all(model: ServedModel, raws: list[RawImage], max_pixels: int) -> list[tuple[Tensor, tuple[int, int]]]:
    out = []
    for raw in raws:
        image = decode_image(raw, max_pixels)
        out.append((model.preprocessor.pixels(image), (image.height, image.width)))
    return out


async def decode_request(
    context: ServiceContext, model: ServedModel, request: Request
) -> list[tuple[Tensor, tuple[int, int]]]:
    """Read the body and decode every image (in a worker thread): ``(uint8 pixels, original (h, w))``."""
    body = await read_body(request, context.settings.max_images_per_request)
    return await run_in_threadpool(_decode_all, model, body.images, context.settings.max_pixels)


async def run_items(
    context: ServiceContext,
    model: ServedModel,
    decoded: list[tuple[Tensor, tuple[int, int]]],
    detectors: tuple[ActiveDetector, ...],
    with_maps: bool,
) -> list[ItemResult]:
    items = [ScoreItem(pixels, detectors, size if with_maps else None) for pixels, size in decoded]
    results: list[ItemResult] = await model.batcher.submit(items)
    context.metrics.images.labels(model.name, "segment" if with_maps else "score").inc(len(items))
    return results
