"""Batches of a source's samples, read and decoded in ``torch.utils.data.DataLoader`` worker processes.

Each worker takes every ``workers``-th of the requested ordinals, reads them (:meth:`FitSource.read`) and decodes
each image with the served model's own path (:func:`service.engine.decode.decode_image`, then
:meth:`service.engine.preprocess.Preprocessor.pixels`), so a fitted detector sees exactly the pixels scoring
feeds it. An image that does not decode is reported in the batch (``invalid``), never raised in the worker, so the
runner can name it in a one-line error or skip and count it; a broken container ends the stream with ``fatal``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from service.engine.decode import RawImage, decode_image
from service.engine.preprocess import Preprocessor
from service.errors import ServiceError
from service.fit.sources.base import DataSourceError, FitSource, SourceIndex

Item = tuple[int, int, Any, str | None]
"""``(ordinal, label, pixels or output row or None, error)``; ordinal -1 with an error: the stream broke."""


class ImageDecoder:
    """Encoded bytes -> ``uint8`` pixels at the model's input size (the scoring path)."""

    def __init__(self, preprocessor: Preprocessor, max_pixels: int) -> None:
        self.preprocessor = preprocessor
        self.max_pixels = max_pixels

    def __call__(self, data: bytes, name: str) -> Tensor:
        return self.preprocessor.pixels(decode_image(RawImage(data, name), self.max_pixels))


@dataclass
class Batch:
    """Decoded samples of one batch (``ordinals``, ``labels``, and ``pixels`` or stacked ``outputs``), the
    samples that did not decode (``invalid``: ordinal, reason) and a fatal reading error."""

    ordinals: Tensor
    labels: Tensor
    images: Tensor | None = None
    """``B x C x H x W`` uint8: one tensor, so a worker hands a batch over in one shared-memory block."""
    outputs: dict[str, Tensor] = field(default_factory=dict)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    fatal: str | None = None

    def __len__(self) -> int:
        return int(self.ordinals.numel())

    @property
    def pixels(self) -> list[Tensor]:
        """The images as ``C x H x W`` views (what :meth:`ServedModel.forward` takes)."""
        return list(self.images.unbind(0)) if self.images is not None else []


class _Samples(IterableDataset[Item]):
    def __init__(self, source: FitSource, index: SourceIndex, ordinals: list[int], decoder: ImageDecoder | None):
        self.source, self.index, self.ordinals, self.decoder = source, index, ordinals, decoder

    def _name(self, ordinal: int) -> str:
        ref = self.index.refs[ordinal] if self.index.refs else self.index.keys[ordinal]
        return f"{self.source.description}: {ref}"

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        mine = self.ordinals[info.id :: info.num_workers] if info is not None else self.ordinals
        try:
            for ordinal, payload in self.source.read(self.index, mine):
                label = int(self.index.labels[ordinal])
                if isinstance(payload, dict) or self.decoder is None:
                    yield ordinal, label, payload, None
                    continue
                try:
                    yield ordinal, label, self.decoder(payload, self._name(ordinal)), None
                except ServiceError as exc:  # ImageDecodeError / ImageTooLargeError: detail names the member
                    yield ordinal, label, None, exc.detail
                except (ValueError, OSError) as exc:
                    yield ordinal, label, None, f"{self._name(ordinal)}: cannot decode image: {exc}"
        except DataSourceError as exc:
            yield -1, 0, None, exc.detail


def _collate(items: list[Item]) -> Batch:
    good = [i for i in items if i[3] is None]
    batch = Batch(
        ordinals=torch.tensor([i[0] for i in good], dtype=torch.int64),
        labels=torch.tensor([i[1] for i in good], dtype=torch.int64),
        invalid=[(i[0], i[3]) for i in items if i[3] is not None and i[0] >= 0],
        fatal=next((i[3] for i in items if i[3] is not None and i[0] < 0), None),
    )
    if good and isinstance(good[0][2], dict):
        batch.outputs = {name: torch.stack([i[2][name] for i in good]) for name in good[0][2]}
    elif good:
        batch.images = torch.stack([i[2] for i in good])
    return batch


def iter_batches(
    source: FitSource,
    index: SourceIndex,
    ordinals: Sequence[int],
    *,
    batch_size: int,
    workers: int = 0,
    decoder: ImageDecoder | None = None,
) -> Iterator[Batch]:
    """Batches of the given local ordinals (each batch from one worker; batches in a deterministic order)."""
    if not ordinals:
        return
    workers = max(0, min(workers, len(ordinals)))
    loader = DataLoader(
        _Samples(source, index, list(ordinals), decoder),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )
    yield from loader
