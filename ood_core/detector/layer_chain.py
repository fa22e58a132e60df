"""Consecutive layers applied in turn, keeping every layer's output: what :class:`~ood_core.detector.Gram` and
:class:`~ood_core.detector.MultiMahalanobis` score (their ``feature_layers`` / ``model`` lists). This module holds
no formula."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor

__all__ = ["chained_outputs"]


def chained_outputs(layers: Iterable[Callable[[Tensor], Tensor]], x: Tensor) -> list[Tensor]:
    """``[f_1(x), f_2(f_1(x)), ...]``: the output of every layer, each fed the previous one's."""
    outputs = []
    for layer in layers:
        x = layer(x)
        outputs.append(x)
    return outputs
