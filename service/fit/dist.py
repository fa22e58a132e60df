"""torch.distributed for fits: start from torchrun's environment, and make every rank fail when one does.

``torchrun --nproc-per-node N -m service.fit ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous;
:func:`init_from_env` joins the group (NCCL when CUDA is present, each rank on ``cuda:LOCAL_RANK``; Gloo on CPUs).
Every stage of a fit ends in :func:`agree`: an all-reduce of an error flag, so a rank that raised makes every
other rank raise :class:`RankFailedError` at the same point instead of waiting in the next collective (a rank that
dies outright is handled by torchrun, which stops the others). Collectives move tensors only (never pickled
objects); statistics and scores go through :mod:`ood_core.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from service.errors import ServiceError

T = TypeVar("T")


class RankFailedError(ServiceError):
    """Another rank of a distributed fit failed (its own output says why)."""

    title = "Distributed fit failed"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the fit: ``rank`` of ``world`` (``world == 1``: no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device: str | None = None, timeout_s: float = 1800.0) -> tuple[Ranks, str | None]:
    """Join the process group torchrun describes (if ``WORLD_SIZE`` > 1); returns the ranks and the device this
    rank runs on (``cuda:LOCAL_RANK`` under NCCL, else ``device``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(), device
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} but this machine has {torch.cuda.device_count()} CUDA device(s): start at most "
                "that many processes per node (--nproc-per-node), or fit on the CPU (--device cpu, Gloo)"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _flag_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def agree(ranks: Ranks, error: BaseException | None, stage: str) -> None:
    """All-reduce whether any rank failed ``stage``: re-raise this rank's error, or raise RankFailedError."""
    if not ranks.distributed:
        if error is not None:
            raise error
        return
    flag = torch.tensor([ranks.rank + 1 if error is not None else 0], dtype=torch.int64, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RankFailedError(f"rank {int(flag.item()) - 1} failed while {stage}; its output says why")


def staged(ranks: Ranks, stage: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then :func:`agree` on the outcome."""
    try:
        result = fn()
    except Exception as exc:
        agree(ranks, exc, stage)
        raise
    agree(ranks, None, stage)
    return result


def gather(ranks: Ranks, t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (``t`` itself for one process)."""
    if not ranks.distributed:
        return t
    from ood_core.distributed import all_gather_tensor

    return all_gather_tensor(t).cpu()


def total(ranks: Ranks, value: int) -> int:
    """Sum of ``value`` over the ranks."""
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    dist.all_reduce(t)
    return int(t.item())
