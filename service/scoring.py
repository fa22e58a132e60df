"""What the batcher computes: one forward per batch, then every detector the batch's requests asked for, on
exactly the rows that asked for it; and how a score becomes a verdict.

Threshold of a detector for a request: ``?threshold=`` if given; else the calibration's threshold at ``?tpr=``
or at the calibration's target TPR (95% by default). A detector state without calibration and a request without
``?threshold=`` get ``threshold``, ``is_ood`` and ``p_value`` = ``null``. ``is_ood = score > threshold``;
``p_value = (1 + #{calibration scores >= score}) / (n + 1)`` (conformal; Bates et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.errors import BadRequestError
from service.preprocess import Preprocessor
from service.runtime import ActiveDetector, ServedModel


@dataclass(frozen=True, eq=False)
class ScoreItem:
    """One image to score: preprocessed pixels, the detectors its request resolved, and (segmentation) the
    size to give the score maps."""

    pixels: Tensor
    detectors: tuple[ActiveDetector, ...]
    map_size: tuple[int, int] | None = None


@dataclass
class ItemResult:
    """Prediction and scores of one image (``maps``: per-pixel scores at ``map_size``, CPU float32)."""

    class_index: int | None = None
    probability: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)


def process_batch(model: ServedModel, items: list[ScoreItem]) -> list[ItemResult]:
    """The batcher's ``process``: runs in the batch worker thread."""
    outputs = model.forward([item.pixels for item in items])
    results = [ItemResult() for _ in items]
    if model.task == "classification":
        probs = torch.softmax(outputs["logits"], dim=1)
        best, index = probs.max(dim=1)
        for result, p, i in zip(results, best.tolist(), index.tolist(), strict=True):
            result.class_index, result.probability = int(i), float(p)
    unique: dict[int, ActiveDetector] = {}
    for item in items:
        for active in item.detectors:
            unique.setdefault(id(active), active)
    for active in unique.values():
        rows = [i for i, item in enumerate(items) if any(a is active for a in item.detectors)]
        inputs = outputs[active.input_kind]
        selected = inputs if len(rows) == len(items) else inputs[torch.tensor(rows, device=inputs.device)]
        with torch.no_grad():
            scores = active.detector.predict_features(selected).float().cpu()
        for row, score in zip(rows, scores, strict=True):
            if model.task == "classification":
                results[row].scores[active.name] = float(score)
            else:
                size = items[row].map_size or tuple(score.shape[-2:])
                results[row].maps[active.name] = Preprocessor.resize_map(score, (int(size[0]), int(size[1])))
    return results


def check_threshold_params(threshold: float | None, tpr: float | None) -> None:
    if threshold is not None and tpr is not None:
        raise BadRequestError("give either 'threshold' or 'tpr', not both")
    if tpr is not None and not 0.0 < tpr <= 1.0:
        raise BadRequestError(f"'tpr' must be in (0, 1], got {tpr}")
    if threshold is not None and not torch.isfinite(torch.tensor(threshold)):
        raise BadRequestError("'threshold' must be a finite number")


def threshold_for(active: ActiveDetector, threshold: float | None, tpr: float | None) -> float | None:
    """The threshold a request uses for ``active`` (``None``: no calibration and none given)."""
    if threshold is not None:
        return float(threshold)
    calibration = active.detector.calibration
    if calibration is None:
        return None
    cached = active.thresholds.get(tpr)
    if cached is None:
        cached = active.thresholds[tpr] = calibration.threshold(tpr)
        if len(active.thresholds) > 64:  # arbitrary ?tpr= values must not grow it without bound
            active.thresholds.clear()
    return cached


def verdicts(active: ActiveDetector, scores: Tensor, threshold: float | None) -> tuple[Tensor | None, Tensor | None]:
    """``(is_ood, p_value)`` tensors for ``scores`` (``None`` where not available)."""
    is_ood = None if threshold is None else scores > threshold
    calibration = active.detector.calibration
    p_values = None if calibration is None else calibration.p_values(scores)
    return is_ood, p_values


def json_float(value: float) -> float | None:
    """JSON has no NaN/Inf: a non-finite score is reported as ``null`` (its verdict still uses the real value)."""
    return value if math.isfinite(value) else None
