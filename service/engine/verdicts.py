"""How a score becomes a verdict, vectorised per batch in the worker.

Threshold of a detector for a request: ``?threshold=`` if given; else the calibration's threshold at ``?tpr=``
or at the calibration's target TPR (95% by default). A detector state without calibration and a request without
``?threshold=`` get ``threshold``, ``is_ood`` and ``p_value`` = ``null``.

* Classification: ``is_ood = score > threshold``; ``p_value = (1 + #{calibration scores >= score}) / (n + 1)``
  (conformal; Bates et al., "Testing for outliers with conformal p-values", Ann. Statist. 2023): one
  ``searchsorted`` over the calibration scores per batch, one comparison against the per-row thresholds.
* Segmentation: per image ``ood_share = mean(map > threshold)`` over the map at the size the image had, and
  ``max_score = max(map)``; the image counts as OOD in the metrics when some pixel is above the threshold.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from service.engine.active import ActiveDetector
from service.engine.items import ItemResult, ScoreItem
from service.engine.maps import encode_map
from service.errors import BadRequestError


def check_threshold_params(threshold: float | None, tpr: float | None) -> None:
    """``?threshold=`` must be finite, ``?tpr=`` in (0, 1]; with both, ``threshold`` applies (as documented)."""
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


def segmentation_verdicts(
    active: ActiveDetector, items: list[ScoreItem], results: list[ItemResult], maps: list[Tensor]
) -> None:
    """Fill ``scores`` (per-image maximum) and ``verdicts`` of ``results`` for ``active`` from the per-pixel
    ``maps`` (already at each item's ``map_size``): the encoded map goes into the verdict when the item names an
    encoding, else the tensor into ``maps``."""
    name, version = active.name, active.stored.version
    for item, result, scores in zip(items, results, maps, strict=True):
        used = threshold_for(active, item.threshold, item.tpr)
        share = None if used is None else float((scores > used).float().mean())
        max_score = float(scores.max())
        result.scores[name] = max_score
        verdict: dict[str, object] = {
            "threshold": used,
            "ood_share": share,
            "max_score": json_float(max_score),
            "version": version,
        }
        if item.map_format is None:
            result.maps[name] = scores
        else:
            verdict["map"] = encode_map(scores, item.map_format)
        result.verdicts[name] = verdict
