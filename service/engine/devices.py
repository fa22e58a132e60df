"""Getting a batch onto the model's device and running it fast there: device choice, reduced precision,
cuDNN settings, batch padding and staging.

Staging (:class:`Stager`) turns the per-image ``uint8`` tensors of one batch into one ``N x C x H x W`` tensor on
the device. On CUDA it is written into page-locked (pinned) host memory and copied with ``non_blocking=True`` on a
side stream, with an event the compute stream waits on (:meth:`Stager.ready`), so the batcher can stage batch
``k + 1`` in its prepare thread while batch ``k`` computes and the device never waits for the host. Pinned blocks
come from PyTorch's caching host allocator (no ``cudaHostAlloc`` per batch); the device tensor is allocated on the
side stream and marked as used by the compute stream (``record_stream``) so the allocator never hands its memory
out while the forward still reads it. On the CPU staging is one ``torch.stack``. Batches are laid out
``channels_last`` when the network runs in it.

Padding: with ``cudnn.benchmark`` cuDNN autotunes every new input shape (hundreds of milliseconds for a large
network), a ``torch.compile``-d graph is guarded on ranges of the batch size (a size outside them recompiles, for
seconds), and adaptive batching produces every batch size from 1 to the maximum. Batches are therefore padded
with blank rows up to the next of a few sizes (:func:`batch_buckets`: 1, 2, 4, 8, then multiples of 8, and the
maximum) on CUDA with autotuning and whenever the extractor is compiled; every such size is run once before the
service is ready, and the padded rows are dropped from the outputs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.settings import Autocast


def pick_device(requested: str | None) -> torch.device:
    """``requested`` (``cuda``, ``cuda:1``, ``cpu``...), else CUDA when present."""
    return torch.device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(setting: Autocast, device: torch.device) -> torch.dtype | None:
    """The forward's reduced-precision dtype: ``None`` (float32), ``bfloat16`` or ``float16``; ``true`` means the
    device's usual one (float16 on CUDA, bfloat16 on the CPU). Refuses bfloat16 on a GPU without it."""
    if setting is False:
        return None
    if setting is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    dtype = torch.bfloat16 if setting == "bfloat16" else torch.float16
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"autocast bfloat16: {torch.cuda.get_device_name(device)} does not support it; use float16")
    return dtype


def configure_cudnn(device: torch.device, benchmark: bool) -> None:
    """cuDNN autotuning on (or off) for CUDA devices; nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Padded batch sizes: 1, 2, 4, 8, then every multiple of 8, and ``max_batch_size`` (at most 2x the rows of
    a batch below 8 and at most 7 extra rows above)."""
    sizes = {s for s in (1, 2, 4) if s < max_batch_size}
    sizes.update(range(8, max_batch_size, 8))
    sizes.add(max_batch_size)
    return tuple(sorted(sizes))


@dataclass
class Staged:
    """One batch on the model's device: ``batch`` (``uint8``, ``rows`` real rows, padded up to ``len(batch)``),
    and on CUDA the event its copy records and the pinned source kept alive until the batch is consumed."""

    batch: Tensor
    rows: int
    copied: Any = None
    host: Tensor | None = None


class Stager:
    """Stacks a batch's images and moves them to ``device`` (see the module docstring)."""

    def __init__(
        self, device: torch.device, buckets: tuple[int, ...] | None = None, channels_last: bool = False
    ) -> None:
        self.device = device
        self.buckets = buckets
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        """Layout of staged batches: ``channels_last`` for networks that run in it (and the HWC layout images come
        out of Pillow in: the stack is then a plain copy)."""
        self.stream: Any = torch.cuda.Stream(device) if device.type == "cuda" else None

    def padded_size(self, rows: int) -> int:
        if not self.buckets or rows > self.buckets[-1]:
            return rows
        return self.buckets[bisect.bisect_left(self.buckets, rows)]

    def stage(self, pixels: list[Tensor]) -> Staged:
        """Safe to call from another thread than :meth:`ready` (the batcher's prepare thread)."""
        rows = len(pixels)
        size = self.padded_size(rows)
        pinned = self.stream is not None
        host = torch.empty(
            (size, *pixels[0].shape), dtype=torch.uint8, pin_memory=pinned, memory_format=self.memory_format
        )
        torch.stack(pixels, out=host[:rows])
        if size > rows:
            host[rows:].zero_()
        if not pinned:
            return Staged(host, rows)
        with torch.cuda.stream(self.stream):
            batch = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return Staged(batch, rows, copied, host)

    def ready(self, staged: Staged) -> Tensor:
        """The staged batch, usable on the calling thread's current stream (waits for its copy on the device,
        not on the host)."""
        if staged.copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.copied)
            staged.batch.record_stream(current)
        return staged.batch
