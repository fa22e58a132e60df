"""One rank of the 2-process Gloo fit of ``test_distributed.py``: ``python -m tests.ood_core.distributed_worker
RANK WORLD PORT OUT``. Fits every case of :mod:`tests.ood_core.fit_cases` on this rank's shard, merging each pass
across the ranks, and writes the states (and a gathered tensor) to ``OUT/<rank>/`` as safetensors."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ood_core.detector import KNN
from ood_core.distributed import all_gather_tensor, merge_across_ranks

from .fit_cases import CASES, N, batches

#: where the shards of the two ranks meet (uneven on purpose)
SPLIT = 61


def shard(rank: int, world: int) -> list[int]:
    start, stop = (0, SPLIT) if rank == 0 else (SPLIT, N)
    return [start, (start + stop) // 2, stop]


def main(rank: int, world: int, port: int, out: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    mine = out / str(rank)
    mine.mkdir(parents=True, exist_ok=True)
    for name, case in sorted(CASES.items()):
        z, y = case.data()
        det = case.make()
        while True:
            for zb, yb in batches(z, y, shard(rank, world)):
                det.partial_fit_features(zb, yb)
            merge_across_ranks(det)
            if det.finish_pass():
                break
        save_file({k: getattr(det, k).contiguous() for k in det.state_spec}, str(mine / f"{name}.safetensors"))
    rows = torch.arange(6.0 * (2 * rank + 1)).reshape(2 * rank + 1, 2, 3) + 100 * rank
    save_file({"gathered": all_gather_tensor(rows)}, str(mine / "gathered.safetensors"))
    try:  # ranks with other hyperparameters: every rank refuses the merge
        merge_across_ranks(KNN(None, k=3 + rank).partial_fit_features(torch.rand(5, 2), torch.zeros(5)))
    except ValueError as exc:
        (mine / "refused.txt").write_text(str(exc))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
