"""Merging fit statistics across the ranks of a ``torch.distributed`` process group (Gloo, NCCL).

Every rank fits its own shard of the data (:meth:`~ood_core.api.Detector.partial_fit`), then calls
:func:`merge_across_ranks` and :meth:`~ood_core.api.Detector.finish_pass`, once per pass::

    detector.begin_fit()
    while True:
        detector.partial_fit(my_shard_loader, device)
        merge_across_ranks(detector)
        if detector.finish_pass():
            break

Statistics travel as safetensors bytes in ``uint8`` tensors (their sizes gathered first): no pickle and no
``*_object`` collective. Every rank merges every rank's statistics in rank order, so all ranks hold the same
merged statistics and finish to the same state (and a mismatch, such as other hyperparameters on one rank,
fails on every rank alike). Tensors are moved to the backend's device (the current CUDA device for NCCL, the
CPU otherwise) for the collectives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from safetensors.torch import save as st_save
from torch import Tensor

from ood_core.api import Detector
from ood_core.state_format import DTYPES
from ood_core.state_io import read_source

__all__ = ["all_gather_tensor", "backend_device", "merge_across_ranks"]

#: most dimensions of a tensor gathered by :func:`all_gather_tensor`
MAX_RANK = 8
_DTYPE_CODES = [dtype for dtype, _ in DTYPES.values()]


def backend_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where the group's collectives need their tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensor(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's ``t`` concatenated along the first dimension, in rank order (first dimensions may differ;
    dtype and the other dimensions must agree, else ``ValueError`` on every rank). Returned on ``t``'s device.

    The shapes are gathered first (one small ``int64`` header per rank); the data then travels as bytes
    (``uint8`` rows, padded to the longest rank), so any dtype works on any backend."""
    if t.dim() < 1 or t.dim() > MAX_RANK or t.dtype not in _DTYPE_CODES:
        raise ValueError(
            f"all_gather_tensor needs 1 to {MAX_RANK} dims of a safetensors dtype, got {t.dtype} {t.dim()}"
        )
    device = backend_device(group)
    world = dist.get_world_size(group)
    header = torch.full((2 + MAX_RANK,), -1, dtype=torch.int64)
    header[0], header[1] = t.dim(), _DTYPE_CODES.index(t.dtype)
    header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    headers = [torch.empty_like(header, device=device) for _ in range(world)]
    dist.all_gather(headers, header.to(device), group=group)
    rows = [int(h[2]) for h in headers]
    mine = header.clone()
    mine[2] = 0
    for rank, h in enumerate(headers):
        other = h.cpu().clone()
        other[2] = 0
        if not torch.equal(other, mine):
            raise ValueError(f"all_gather_tensor: rank {rank} has another dtype or trailing shape than this rank")
    row_elements = math.prod(t.shape[1:])
    row_bytes = row_elements * t.element_size()
    total = sum(rows)
    if row_bytes == 0 or max(rows) == 0:
        return t.new_empty((total, *t.shape[1:]))
    local = t.detach().contiguous().reshape(t.shape[0], row_elements).view(torch.uint8)
    padded = torch.zeros(max(rows), row_bytes, dtype=torch.uint8, device=device)
    padded[: t.shape[0]] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    data = torch.cat([g[:n] for g, n in zip(gathered, rows, strict=True)])
    return data.view(t.dtype).reshape(total, *t.shape[1:]).to(t.device)


def _all_gather_bytes(payload: bytes, group: dist.ProcessGroup | None) -> list[bytes]:
    """Every rank's ``payload``, in rank order (sizes gathered first, then the padded bytes)."""
    device = backend_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    gathered = [torch.empty(max(lengths), dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, buf.to(device), group=group)
    return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]


def merge_across_ranks(detector: Detector, group: dist.ProcessGroup | None = None) -> None:
    """Replace every rank's statistics of the current pass by the merge of all ranks' statistics.

    Each rank's :meth:`~ood_core.api.Detector.fit_statistics` is serialized as safetensors, all-gathered, and
    merged (:meth:`~ood_core.api.Detector.merge_fit_statistics`) in rank order into emptied statistics, so
    every rank ends with identical statistics. Raises ``ValueError`` on every rank when the ranks' statistics
    do not merge (another class, hyperparameters or pass)."""
    payloads = _all_gather_bytes(st_save(detector.fit_statistics()), group)
    detector._clear_pass_statistics()
    while payloads:
        _, tensors = read_source(payloads.pop(0), with_tensors=True)
        detector.merge_fit_statistics(tensors)
