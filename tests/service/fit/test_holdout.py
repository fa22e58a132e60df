"""The calibration hold-out: per-class quotas by largest remainders, the smallest seeded hashes of each class, and
the same choice whatever the order of the samples and however they are spread over ranks."""

from __future__ import annotations

import hashlib

import pytest
import torch

from service.errors import BadRequestError
from service.fit.holdout import calibration_mask, class_quotas, key_hashes, split_calibration


def test_hash_is_the_seeded_blake2b_of_the_key() -> None:
    digest = hashlib.blake2b(b"7:0/img_001", digest_size=8).digest()
    assert int(key_hashes(["0/img_001"], seed=7)) == int.from_bytes(digest, "big") >> 1
    assert key_hashes(["a"], 0) != key_hashes(["a"], 1)


def test_quotas_by_largest_remainder() -> None:
    # 4 + 2 ID samples, half held out: exact 2 and 1
    assert class_quotas(torch.tensor([0, 0, 0, 0, 1, 1, -1]), 0.5) == {0: 2, 1: 1}
    # 3 classes of 3, half: round(4.5) = 5 in all, 1.5 each -> 1 each, then +1 to classes 0 and 1 (equal remainders)
    assert class_quotas(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), 0.5) == {0: 2, 1: 2, 2: 1}
    # 10% of 7 + 13 = 2: 0.7 and 1.3 -> floors 0 and 1, the larger remainder (0.7) gets the other one
    assert class_quotas(torch.tensor([0] * 7 + [1] * 13), 0.1) == {0: 1, 1: 1}


def test_holds_out_the_smallest_hashes_of_each_class() -> None:
    keys = [f"k{i}" for i in range(9)]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, -1])
    hashes = key_hashes(keys, seed=3)
    mask = calibration_mask(hashes, labels, 0.5)
    for label in (0, 1):
        members = torch.nonzero(labels == label).flatten()
        smallest = members[torch.argsort(hashes[members])[:2]]
        assert sorted(torch.nonzero(mask & (labels == label)).flatten().tolist()) == sorted(smallest.tolist())
    assert not mask[8]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_the_same_whatever_the_order_and_the_ranks(world: int) -> None:
    generator = torch.Generator().manual_seed(world)
    keys = [f"{c}/img_{i:03d}" for c in range(4) for i in range(37)] + [f"ood/{i}" for i in range(20)]
    labels = torch.tensor([c for c in range(4) for _ in range(37)] + [-1] * 20)
    want = {k for k, m in zip(keys, calibration_mask(key_hashes(keys, 5), labels, 0.2), strict=True) if m}
    order = torch.randperm(len(keys), generator=generator).tolist()
    shards = [order[r::world] for r in range(world)]
    hashes = [key_hashes([keys[i] for i in shard], 5) for shard in shards]
    shard_labels = [labels[shard] for shard in shards]

    def gather(t: torch.Tensor) -> torch.Tensor:  # what all_gather_tensor returns: every rank's, in rank order
        group = hashes if any(t is h for h in hashes) else shard_labels
        return torch.cat(group)

    got = set()
    for rank, shard in enumerate(shards):
        mask = calibration_mask(hashes[rank], shard_labels[rank], 0.2, gather)
        got |= {keys[i] for i, m in zip(shard, mask.tolist(), strict=True) if m}
    assert got == want
    assert len(want) == round(0.2 * 4 * 37) and all(
        abs(sum(k.startswith(f"{c}/") for k in want) - 7.4) < 1 for c in range(4)
    )


def test_split_calibration_of_in_memory_samples() -> None:
    labels = torch.tensor([0, 1] * 10 + [-1, -1])
    fit, calibration = split_calibration(labels, 0.2, seed=1)
    assert sorted(fit.tolist() + calibration.tolist()) == list(range(22))
    assert labels[calibration].tolist().count(0) == 2 and labels[calibration].tolist().count(1) == 2
    assert {20, 21} <= set(fit.tolist())
    assert torch.equal(split_calibration(labels, 0.2, seed=1)[1], calibration)
    with pytest.raises(BadRequestError, match="at least one image on each side"):
        split_calibration(torch.tensor([0, 1]), 0.1)


def test_a_class_with_one_image_keeps_it_for_the_fit() -> None:
    # the hold-out used to take class 0's only image (then "classes [0] have no samples" at the fit)
    labels = torch.tensor([0] + [1] * 9)
    quotas = class_quotas(labels, 0.5)
    assert quotas[0] == 0
    assert quotas[1] == 5  # the share is still met, from the classes that have images to spare
    assert all(quotas[c] < int((labels == c).sum()) for c in quotas)
