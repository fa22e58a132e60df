"""Mahalanobis.fit(loader) streams: same state as one big batch, memory independent of the batch count."""

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ood_core.detector import RMD, Mahalanobis

DIM, CLASSES, BATCH = 16, 5, 8


def make_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centres = 5.0 + 3.0 * torch.randn(CLASSES, DIM, generator=g)  # far from the origin on purpose
    batches = []
    for _ in range(count):
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        y[0] = -1  # an OOD sample in every batch, to be ignored
        batches.append((centres[y.clamp_min(0)] + torch.randn(BATCH, DIM, generator=g), y))
    for c in range(CLASSES):  # every class present
        batches[0][1][c + 1] = c
    return batches


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created by torch ops that are still alive, and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                self.largest = max(self.largest, size)
                key = id(t)
                self.live[key] = size
                weakref.finalize(t, self.live.pop, key, None)
        return out

    def live_bytes(self) -> int:
        return sum(self.live.values())


def measured_loader(batches: list[Any], mode: LiveTensorBytes, peaks: list[int]) -> Iterator[Any]:
    for x, y in batches:
        yield x.clone(), y.clone()  # created inside the mode: tracked if the detector keeps them
        peaks.append(mode.live_bytes())  # after the detector folded the batch in


def fit_and_measure(count: int) -> tuple[int, int]:
    batches = make_batches(count)
    peaks: list[int] = []
    with LiveTensorBytes() as mode:
        Mahalanobis(torch.nn.Identity()).fit(measured_loader(batches, mode, peaks))
    return max(peaks), mode.largest


def test_streaming_fit_equals_fit_on_concatenation() -> None:
    batches = make_batches(200)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    for cls in (Mahalanobis, RMD):
        streamed = cls(torch.nn.Identity()).fit(batches)
        whole = cls(None).fit_features(x, y)
        for name in cls.state_spec:
            torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), rtol=1e-9, atol=1e-9)
    # and the state is the textbook estimate (class means, pooled scatter / N) on the ID samples
    known = y >= 0
    mu = torch.stack([x[y == c].double().mean(0) for c in range(CLASSES)])
    centred = x[known].double() - mu[y[known]]
    cov = centred.T @ centred / known.sum()
    torch.testing.assert_close(whole.mu, mu)
    torch.testing.assert_close(whole.precision, torch.linalg.inv(cov))


def test_streaming_fit_memory_does_not_grow_with_batches() -> None:
    live_20, largest_20 = fit_and_measure(20)
    live_200, largest_200 = fit_and_measure(200)
    data_bytes = 200 * BATCH * DIM * 8  # the whole data set in float64
    assert live_200 <= live_20 * 1.05
    assert largest_200 == largest_20
    assert live_200 < data_bytes / 4
    assert largest_200 <= max(DIM * DIM, CLASSES * DIM, BATCH * DIM) * 8
