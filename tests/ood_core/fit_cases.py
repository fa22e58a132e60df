"""Every detector that needs a fit, on small synthetic network outputs, and helpers that fit it in several ways
(one stream, incremental calls, merged shards). Shared by the partial-fit, checkpoint and distributed tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ood_core.api import Detector
from ood_core.detector import (
    DICE,
    KNN,
    RMD,
    SHE,
    KLMatching,
    Mahalanobis,
    MultiMahalanobis,
    OpenMax,
    ReAct,
    TemperatureScaling,
    ViM,
)

DIM, CLASSES, N = 6, 3, 150


def _features(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(CLASSES, DIM, generator=g) + 3.0  # off the origin on purpose
    y = torch.arange(N) % CLASSES
    z = centres[y] + torch.randn(N, DIM, generator=g) * torch.linspace(0.5, 2.0, DIM)
    y = torch.where(torch.rand(N, generator=g) < 0.1, -1, y)  # some OOD rows, ignored by every fit
    y[:CLASSES] = torch.arange(CLASSES)
    return z, y


def _logits(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % CLASSES
    z = 3.0 * nn.functional.one_hot(y, CLASSES).float() + 1.5 * torch.randn(N, CLASSES, generator=g)
    return z, torch.where(torch.rand(N, generator=g) < 0.1, -1, y)


def _maps(seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(N, 2, 3, 3, generator=g)), torch.randint(-1, CLASSES, (N,), generator=g)


def _layers(seed: int = 3) -> tuple[list[Tensor], Tensor]:
    z, y = _features(seed)
    return [z, torch.tanh(z @ torch.ones(DIM, 4) / DIM)], y


def _head() -> nn.Linear:
    z, y = _features()
    head = nn.Linear(DIM, CLASSES)
    with torch.no_grad():  # nearest-centre classifier: most ID rows are classified correctly
        centres = torch.stack([z[y == c].mean(0) for c in range(CLASSES)])
        head.weight.copy_(centres)
        head.bias.copy_(-0.5 * (centres * centres).sum(1))
    return head


@dataclass(frozen=True)
class FitCase:
    """A detector factory and the outputs (``z``, ``y``) it is fitted on."""

    make: Callable[[], Detector]
    data: Callable[[], tuple[Any, Tensor]]
    #: ``(atol, rtol)`` of the state comparison (float32 inputs, float64 accumulators)
    tol: tuple[float, float] = (1e-6, 1e-5)


_W = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(4))
_B = torch.tensor([0.1, -0.2, 0.3])
_MAP_HEAD = nn.Conv2d(2, CLASSES, 1)

CASES: dict[str, FitCase] = {
    "Mahalanobis": FitCase(lambda: Mahalanobis(None, eps=0.0), _features),
    "RMD": FitCase(lambda: RMD(None), _features),
    "MultiMahalanobis": FitCase(lambda: MultiMahalanobis(None), _layers),
    "ViM": FitCase(lambda: ViM(None, 2, _W, _B), _features),
    "KNN": FitCase(lambda: KNN(None, k=3), _features),
    "OpenMax": FitCase(lambda: OpenMax(None, tailsize=6, alpha=2), _logits),
    "ReAct": FitCase(lambda: ReAct(None, _MAP_HEAD, threshold=None, percentile=0.8), _maps),
    "DICE": FitCase(lambda: DICE(None, _W, _B, 0.5), _features),
    "SHE": FitCase(lambda: SHE(None, _head()), _features),
    "KLMatching": FitCase(lambda: KLMatching(None), _logits),
    "TemperatureScaling": FitCase(lambda: TemperatureScaling(None), _logits),
}


def rows(data: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of outputs (a tensor or a list of per-layer tensors)."""
    return [t[start:stop] for t in data] if isinstance(data, list) else data[start:stop]


def batches(z: Any, y: Tensor, bounds: list[int]) -> list[tuple[Any, Tensor]]:
    """The outputs cut at ``bounds`` (e.g. ``[0, 40, 41, 150]``: uneven pieces, one of a single row)."""
    return [(rows(z, a, b), y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def fit_shards(make: Callable[[], Detector], shards: list[list[tuple[Any, Tensor]]]) -> list[Detector]:
    """One detector per shard, each pass merged as the ranks of a distributed fit do: every shard folds its own
    batches, then merges every other shard's statistics, then finishes the pass."""
    detectors = [make() for _ in shards]
    while True:
        for det, shard in zip(detectors, shards, strict=True):
            for z, y in shard:
                det.partial_fit_features(z, y)
        stats = [det.fit_statistics() for det in detectors]
        for i, det in enumerate(detectors):
            for j, other in enumerate(stats):
                if j != i:
                    det.merge_fit_statistics(other)
        done = [det.finish_pass() for det in detectors]
        if all(done):
            return detectors


def state_of(det: Detector) -> dict[str, Tensor]:
    """The fitted state, with ViM's principal directions as their projector (eigenvector signs are arbitrary)."""
    state = {name: getattr(det, name) for name in det.state_spec}
    if isinstance(det, ViM):
        state["principal"] = det.principal @ det.principal.T
    if isinstance(det, KNN):  # shards merged in another order hold the same rows in another order
        state["bank"] = det.bank[torch.argsort(det.bank @ torch.linspace(1.0, 2.0, det.bank.shape[1]))]
    return state


def assert_same_state(got: Detector, want: Detector, tol: tuple[float, float]) -> None:
    assert got.is_fitted and want.is_fitted
    for name, tensor in state_of(want).items():
        torch.testing.assert_close(state_of(got)[name], tensor, atol=tol[0], rtol=tol[1], msg=name)
