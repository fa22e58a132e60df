"""Mergeable fits: a detector fitted on shards whose statistics are merged, or resumed from a fit checkpoint, equals
one fitted on the whole stream."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor

from ood_core.api import Detector
from ood_core.fit_checkpoint import load_fit_checkpoint, save_fit_checkpoint


def fit_merged(make: Callable[[], Detector], shards: Sequence[Sequence[tuple[Tensor, Tensor]]]) -> Detector:
    """Each shard folded into its own detector; the statistics (through safetensors bytes, as they travel
    between ranks) merged, in reverse shard order, into a fresh one, which then finishes its single pass."""
    stats = []
    for shard in shards:
        worker = make().begin_fit()
        for z, y in shard:
            worker.partial_fit_features(z, y)
        stats.append(load(save(worker.fit_statistics())))
    merged = make().begin_fit()
    for part in reversed(stats):
        merged.merge_fit_statistics(part)
    assert merged.finish_pass(), "a one-pass fit"
    return merged


def fit_resumed(make: Callable[[], Detector], batches: Sequence[tuple[Tensor, Tensor]], **modules: Any) -> Detector:
    """Half the batches, a fit checkpoint (bytes), loaded with ``modules``, then the other half."""
    half = len(batches) // 2
    first = make().begin_fit()
    for z, y in batches[:half]:
        first.partial_fit_features(z, y)
    resumed, _ = load_fit_checkpoint(save_fit_checkpoint(first), **modules)
    for z, y in batches[half:]:
        resumed.partial_fit_features(z, y)
    assert resumed.finish_pass()
    return resumed


def assert_shards_merge_to_stream(
    make: Callable[[], Detector],
    batches: Sequence[tuple[Tensor, Tensor]],
    x: Tensor,
    tol: float = 1e-6,
    **modules: Any,
) -> Detector:
    """Fit ``make()`` on all ``batches`` in one stream, on three shards of them merged, and resumed from a fit
    checkpoint halfway (loaded with the networks ``modules``): same state (allclose) and scores on ``x``.
    Returns the merged detector."""
    stream = make().begin_fit()
    for z, y in batches:
        stream.partial_fit_features(z, y)
    assert stream.finish_pass()
    shards = [batches[0::3], batches[1::3], batches[2::3]]
    merged = fit_merged(make, shards)
    resumed = fit_resumed(make, batches, **modules)
    torch.testing.assert_close(resumed.predict_features(x), stream.predict_features(x), rtol=tol, atol=tol)
    for name in type(stream).state_spec:
        want, got = getattr(stream, name), getattr(merged, name)
        if name == "bank":  # a bank is a set of rows: shards concatenate them in another order
            want, got = _rows_in_order(want), _rows_in_order(got)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"state tensor {name}")
    torch.testing.assert_close(merged.predict_features(x), stream.predict_features(x), rtol=tol, atol=tol)
    return merged


def _rows_in_order(rows: Tensor) -> Tensor:
    """The rows sorted by a fixed random projection (distinct for distinct rows, almost surely)."""
    key = rows.double() @ torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return rows[torch.argsort(key)]
