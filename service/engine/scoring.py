"""What the batcher computes: one forward per batch, then every detector the batch's requests asked for, on
exactly the rows that asked for it; and how a score becomes a verdict.

Threshold of a detector for a request: ``?threshold=`` if given; else the calibration's threshold at ``?tpr=``
or at the calibration's target TPR (95% by default). A detector state without calibration and a request without
``?threshold=`` get ``threshold``, ``is_ood`` and ``p_value`` = ``null``. ``is_ood = score > threshold``;
``p_value = (1 + #{calibration scores >= score}) / (n + 1)`` (conformal; Bates et al. 2023).

For classification the verdicts are computed here, in the batch worker, vectorized over the batch (one
``searchsorted`` over a detector's calibration scores per batch, one comparison against the per-row thresholds),
and every image leaves the worker with its finished JSON entry: the event loop only assembles the response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from service.errors import BadRequestError
from service.preprocess import Preprocessor
from service.runtime import ActiveDetector, ServedModel


@dataclass(frozen=True, eq=False)
class ScoreItem:
    """One image to score: preprocessed pixels, the detectors its request resolved, (segmentation) the size to
    give the score maps, and the request's ``?threshold=`` / ``?tpr=`` (classification verdicts)."""

    pixels: Tensor
    detectors: tuple[ActiveDetector, ...]
    map_size: tuple[int, int] | None = None
    threshold: float | None = None
    tpr: float | None = None


@dataclass
class ItemResult:
    """Prediction and scores of one image (``maps``: per-pixel scores at ``map_size``, CPU float32).

    Classification also fills ``verdicts``: per detector the response entry ``{"score", "threshold", "is_ood",
    "p_value", "version"}`` (``score`` is ``null`` when not finite; ``scores`` keeps the real value)."""

    class_index: int | None = None
    probability: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prediction(self, labels: list[str]) -> dict[str, Any]:
        """``{"index", "label", "probability"}`` of the response."""
        index = self.class_index
        return {"index": index, "label": labels[index] if index is not None else None, "probability": self.probability}


def process_batch(model: ServedModel, items: list[ScoreItem]) -> list[ItemResult]:
    """The batcher's ``process``: runs in the batch worker thread."""
    outputs = model.forward([item.pixels for item in items])
    results = [ItemResult() for _ in items]
    classification = model.task == "classification"
    if classification:
        best, index = torch.softmax(outputs["logits"], dim=1).max(dim=1)
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
        if classification:
            classification_verdicts(active, [items[r] for r in rows], [results[r] for r in rows], scores)
            continue
        for row, score in zip(rows, scores, strict=True):
            size = items[row].map_size or tuple(score.shape[-2:])
            results[row].maps[active.name] = Preprocessor.resize_map(score, (int(size[0]), int(size[1])))
    return results


def classification_verdicts(
    active: ActiveDetector, items: list[ScoreItem], results: list[ItemResult], scores: Tensor
) -> None:
    """Fill ``scores`` and ``verdicts`` of ``results`` (one row each) for ``active``, vectorized over the rows."""
    scores64 = scores.reshape(-1).to(torch.float64)
    used = [threshold_for(active, item.threshold, item.tpr) for item in items]
    calibration = active.detector.calibration
    p_values = None if calibration is None else calibration.p_values(scores64).tolist()
    values = scores64.tolist()
    if all(t is None for t in used):
        is_ood: list[bool | None] = [None] * len(items)
    else:  # one comparison for the batch; rows without a threshold (NaN) get None below
        limits = torch.tensor([math.nan if t is None else t for t in used], dtype=torch.float64)
        is_ood = [v if t is not None else None for v, t in zip((scores64 > limits).tolist(), used, strict=True)]
    name, version = active.name, active.stored.version
    for row, result in enumerate(results):
        value = values[row]
        result.scores[name] = value
        result.verdicts[name] = {
            "score": json_float(value),
            "threshold": used[row],
            "is_ood": is_ood[row],
            "p_value": None if p_values is None else p_values[row],
            "version": version,
        }


def check_threshold_params(threshold: float | None, tpr: float | None) -> None:
    if threshold is not None and tpr is not None:
        raise BadRequestError("give either 'threshold' or 'tpr', not both")
    if tpr is not None and not 0.0 < tpr <= 1.0:
        raise BadRequestError(f"'tpr' must be in (0, 1], got {tpr}")
    if threshold is not None and not math.isfinite(threshold):
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
        cached = calibration.threshold(tpr)
        if len(active.thresholds) >= 64:  # arbitrary ?tpr= values must not grow it without bound
            active.thresholds.clear()
        active.thresholds[tpr] = cached
    return cached


def json_float(value: float) -> float | None:
    """JSON has no NaN/Inf: a non-finite score is reported as ``null`` (its verdict still uses the real value)."""
    return value if math.isfinite(value) else None
