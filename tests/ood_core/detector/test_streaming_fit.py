"""Mahalanobis.fit(loader) streams: same state as one big batch, memory independent of the batch count."""

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
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


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_streaming_fit_equals_fit_on_concatenation(dtype: torch.dtype, tol: float) -> None:
    """float64 features are accumulated in float64 throughout; float32 features are multiplied in float32
    per chunk (sums in float64), so the state agrees with the float64 textbook estimate to float32 rounding."""
    batches = [(x.to(dtype), y) for x, y in make_batches(200)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    for cls in (Mahalanobis, RMD):
        streamed = cls(torch.nn.Identity()).fit(batches)
        whole = cls(None).fit_features(x, y)
        for name in cls.state_spec:
            torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), rtol=tol, atol=tol)
    # and the state is the textbook estimate (class means, pooled scatter / N) on the ID samples
    known = y >= 0
    mu = torch.stack([x[y == c].double().mean(0) for c in range(CLASSES)])
    centred = x[known].double() - mu[y[known]]
    cov = centred.T @ centred / known.sum()
    for fitted in (whole, streamed):
        torch.testing.assert_close(fitted.mu, mu, rtol=tol, atol=tol)
        torch.testing.assert_close(fitted.precision, torch.linalg.inv(cov), rtol=tol, atol=tol)


def test_streaming_fit_memory_does_not_grow_with_batches() -> None:
    live_20, largest_20 = fit_and_measure(20)
    live_200, largest_200 = fit_and_measure(200)
    data_bytes = 200 * BATCH * DIM * 8  # the whole data set in float64
    assert live_200 <= live_20 * 1.05
    assert largest_200 == largest_20
    assert live_200 < data_bytes / 4
    assert largest_200 <= max(DIM * DIM, CLASSES * DIM, BATCH * DIM) * 8


def test_mixed_precision_batches_give_the_same_state() -> None:
    """A float64 batch followed by float32 ones (the working dtype changes mid-fit) gives the state of the
    float64 concatenation, to float32 rounding."""
    batches = make_batches(30)
    mixed = [(x.double(), y) if i == 0 else (x, y) for i, (x, y) in enumerate(batches)]
    streamed = Mahalanobis(torch.nn.Identity()).fit(mixed)
    whole = Mahalanobis(None).fit_features(
        torch.cat([b[0] for b in batches]).double(), torch.cat([b[1] for b in batches])
    )
    torch.testing.assert_close(streamed.mu, whole.mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.precision, whole.precision, rtol=1e-5, atol=1e-5)
