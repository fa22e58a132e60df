"""The calibration hold-out: a stratified, seeded share of the ID samples, the same whatever the number of ranks.

Every sample has a key (its path in the data set without extension, or its position for in-memory data) and a
seeded 63-bit hash of it, ``h = blake2b(f"{seed}:{key}")``. Of the ``N`` ID samples, ``n = round(share * N)`` are
held out, split over the classes by largest remainders (class ``c`` with ``N_c`` samples gets
``floor(share * N_c)``, and the classes with the largest fractional parts one more, so the shares are as equal as
integers allow); class ``c`` holds out its ``n_c`` samples of smallest hash. The choice depends only on the set of
``(key, label)`` pairs and the seed, not on their order nor on how they are spread over ranks (each rank gathers
every rank's hashes and labels, 16 bytes per sample, and takes the same per-class cut-offs). OOD samples
(label < 0) are never held out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from service.errors import BadRequestError

Gather = Callable[[Tensor], Tensor]


def key_hashes(keys: Sequence[str], seed: int) -> Tensor:
    """Seeded 63-bit hashes of the keys (int64, non-negative)."""
    salt = f"{seed}:".encode()
    values = [int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") >> 1 for k in keys]
    return torch.tensor(values, dtype=torch.int64) if values else torch.empty(0, dtype=torch.int64)


def class_quotas(labels: Tensor, share: float) -> dict[int, int]:
    """Held-out samples per ID class (largest remainders; ties to the smaller class)."""
    known = labels[labels >= 0]
    total = known.numel()
    n_cal = math.floor(share * total + 0.5)
    if n_cal < 1 or n_cal >= total:
        raise BadRequestError(
            f"cannot hold out {share:.0%} of {total} ID images for calibration: need at least one image on each side"
        )
    classes, counts = torch.unique(known, return_counts=True)
    sizes = [int(c) for c in counts]
    exact = [share * n for n in sizes]
    # every class keeps at least one image for the fit (a class's only image is never held out)
    quotas = [min(math.floor(e), n - 1) for e, n in zip(exact, sizes, strict=True)]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder:
        if sum(quotas) >= n_cal:
            break
        if quotas[i] < sizes[i] - 1:
            quotas[i] += 1
    return {int(c): q for c, q in zip(classes.tolist(), quotas, strict=True)}


def calibration_mask(hashes: Tensor, labels: Tensor, share: float, gather: Gather | None = None) -> Tensor:
    """Which of these samples (this rank's) are held out; ``gather`` concatenates every rank's tensors (identity
    for one process)."""
    all_hashes = gather(hashes) if gather else hashes
    all_labels = gather(labels) if gather else labels
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    for label, quota in class_quotas(all_labels, share).items():
        if quota == 0:
            continue
        cutoff = torch.kthvalue(all_hashes[all_labels == label], quota).values
        mask |= (labels == label) & (hashes <= cutoff)
    return mask


def split_calibration(labels: Tensor, share: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, calibration)`` of in-memory samples (keys: their positions): the stratified, seeded hold-out
    above. OOD-labelled samples stay in the fit set (detectors ignore them where pytorch-ood does)."""
    labels = labels.reshape(-1).cpu()
    held_out = calibration_mask(key_hashes([str(i) for i in range(labels.numel())], seed), labels, share)
    return torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()
