"""The data of a :class:`~ood_core.search.GridSearch`: network outputs with labels, either given as ``(outputs,
labels)`` or computed once from a loader of ``(x, y)`` batches (:func:`prepare_outputs`), then scored in row
chunks by each candidate (:func:`scores_from_outputs`). Outputs are one tensor, or a list of tensors (one per
layer) for multi-layer detectors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector

__all__ = ["Data", "Outputs", "is_outputs", "prepare_outputs", "scores_from_outputs"]

Outputs = Tensor | list[Tensor]
#: network outputs with labels, or a loader of ``(x, y)`` batches
Data = tuple[Outputs, Tensor] | Iterable[Any]


def is_outputs(data: Any) -> bool:
    """Whether ``data`` is ``(outputs, labels)`` rather than a loader of batches."""
    if not isinstance(data, tuple) or len(data) != 2 or not isinstance(data[1], Tensor):
        return False
    outputs = data[0]
    return isinstance(outputs, Tensor) or (isinstance(outputs, list) and all(isinstance(t, Tensor) for t in outputs))


def _rows_of(outputs: Outputs) -> int:
    return (outputs if isinstance(outputs, Tensor) else outputs[0]).shape[0]


def _slice(outputs: Outputs, start: int, stop: int) -> Outputs:
    return outputs[start:stop] if isinstance(outputs, Tensor) else [t[start:stop] for t in outputs]


def _to(outputs: Outputs, device: torch.device | None) -> Outputs:
    if device is None:
        return outputs
    return outputs.to(device) if isinstance(outputs, Tensor) else [t.to(device) for t in outputs]


def extract_outputs(prototype: Detector, loader: Iterable[Any], device: torch.device | None) -> tuple[Outputs, Tensor]:
    """Network outputs (``prototype``'s feature step) of every batch of ``loader`` (one pass), with the labels."""
    outputs: list[Outputs] = []
    labels: list[Tensor] = []
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], torch.as_tensor(batch[1])
            z = prototype._extract(x if device is None else x.to(device))
            outputs.append(z)
            labels.append(y.to(z.device if isinstance(z, Tensor) else z[0].device))
    if not outputs:
        raise ValueError("the loader yielded no batches")
    y_all = torch.cat(labels)
    if isinstance(outputs[0], Tensor):
        return torch.cat(outputs), y_all  # type: ignore[arg-type]
    return [torch.cat(list(layer)) for layer in zip(*outputs, strict=True)], y_all


def prepare_outputs(prototype: Detector, data: Data, device: torch.device | None) -> tuple[Outputs, Tensor]:
    """``(outputs, labels)`` on ``device``: as given, or extracted from a loader by ``prototype``."""
    if is_outputs(data):
        outputs, labels = data  # type: ignore[misc]
        return _to(outputs, device), labels if device is None else labels.to(device)
    return extract_outputs(prototype, data, device)


def scores_from_outputs(detector: Detector, outputs: Outputs, batch_size: int) -> Tensor:
    """``detector.predict_features`` over ``outputs``, ``batch_size`` rows at a time, concatenated."""
    n = _rows_of(outputs)
    with torch.no_grad():
        parts = [
            detector.predict_features(_slice(outputs, i, i + batch_size))  # type: ignore[arg-type]
            for i in range(0, n, batch_size)
        ]
    return torch.cat(parts)
