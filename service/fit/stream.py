"""One rank's passes over its share of a source: batches through the model's forward, progress, cancellation.

:class:`Streamer` turns the local ordinals a pass needs into ``(batch, outputs)`` pairs: it reads them with
:func:`~service.fit.sources.iter_batches` (decoding in worker processes), raises a one-line
:class:`DataSourceError` for an undecodable image (or, with ``skip_invalid``, marks it skipped and goes on), runs
the batch through ``forward`` (the model's, or the one the server hands in) or takes the precomputed rows, and
reports :class:`FitProgress` after every batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.served_model import ServedModel
from service.fit.sources import Batch, DataSourceError, FitSource, ImageDecoder, SourceIndex, iter_batches

Forward = Callable[[list[Tensor]], dict[str, Tensor]]


class FitCancelled(Exception):
    """The fit was stopped because ``should_stop()`` turned true (nothing was written)."""


@dataclass(frozen=True)
class FitProgress:
    """Where a fit stands (this rank's share): images read so far over every pass and the total to read
    (``None`` while scanning), undecodable images skipped, the rate since the first batch, the time left, and the
    phase (``scanning``, ``fitting``, ``fitting pass 2 of 2``, ``calibrating``)."""

    images_done: int
    images_total: int | None
    images_skipped: int
    images_per_s: float
    eta_s: float | None
    phase: str


class Streamer:
    """Batches of a rank's share with the outputs the detector consumes (``kind``)."""

    def __init__(
        self,
        model: ServedModel,
        source: FitSource,
        index: SourceIndex,
        kind: str,
        *,
        batch_size: int,
        workers: int,
        skip_invalid: bool,
        forward: Forward,
        progress: Callable[[FitProgress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.model, self.source, self.index, self.kind = model, source, index, kind
        self.batch_size, self.workers, self.skip_invalid = batch_size, workers, skip_invalid
        self.forward, self.progress, self.should_stop = forward, progress, should_stop
        self.decoder = ImageDecoder(model.preprocessor, source.limits.max_pixels) if source.kind == "images" else None
        self.skipped = torch.zeros(len(index), dtype=torch.bool)
        """Local ordinals skipped as undecodable (each counted once however many passes read it)."""
        self.skipped_count = 0
        self.done = 0
        self.total: int | None = None
        self.phase = "scanning"
        self._started: float | None = None
        self._counted = 0

    def report(self) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        rate = self._counted / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if self.total is not None and rate > 0 else None
        self.progress(FitProgress(self.done, self.total, self.skipped_count, rate, left, self.phase))

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise FitCancelled("the fit was cancelled")

    def _outputs(self, batch: Batch) -> Tensor:
        if self.decoder is None:
            return batch.outputs[self.kind].to(self.model.device)
        return self.forward(batch.pixels)[self.kind]

    def batches(self, ordinals: Tensor) -> Iterator[tuple[Batch, Tensor]]:
        """``(batch, outputs[kind])`` for the given local ordinals; undecodable images raise or are skipped."""
        if self._started is None:
            self._started = time.perf_counter()
        self.check_stop()
        for batch in iter_batches(
            self.source,
            self.index,
            ordinals.tolist(),
            batch_size=self.batch_size,
            workers=self.workers,
            decoder=self.decoder,
        ):
            if batch.fatal is not None:
                raise DataSourceError(batch.fatal)
            for ordinal, reason in batch.invalid:
                if not self.skip_invalid:
                    raise DataSourceError(f"{reason} (use --skip-invalid to skip and count such images)")
                if not self.skipped[ordinal]:
                    self.skipped[ordinal] = True
                    self.skipped_count += 1
            if len(batch):
                yield batch, self._outputs(batch)
            self.done += len(batch) + len(batch.invalid)
            self._counted += len(batch) + len(batch.invalid)
            self.report()
            self.check_stop()
