"""What travels through a model's batcher: :class:`ScoreItem` in (one image), :class:`ItemResult` out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from service.engine.active import ActiveDetector
from service.engine.maps import MapFormat


@dataclass(frozen=True, eq=False)
class ScoreItem:
    """One image to score: preprocessed pixels, the detectors its request resolved, (segmentation) the size to
    give the score maps and their encoding (``None``: the worker keeps the tensors), the request's
    ``?threshold=`` / ``?tpr=``, and whether its scores go into the metrics (``record``: false for the warm-up)."""

    pixels: Tensor
    detectors: tuple[ActiveDetector, ...]
    map_size: tuple[int, int] | None = None
    threshold: float | None = None
    tpr: float | None = None
    record: bool = True
    map_format: MapFormat | None = None


@dataclass
class ItemResult:
    """Prediction and scores of one image, finished in the batch worker.

    ``verdicts``: per detector the finished response entry. Classification: ``{"score", "threshold", "is_ood",
    "p_value", "version"}`` (``score`` is ``null`` when not finite; ``scores`` keeps the real value).
    Segmentation: ``{"threshold", "ood_share", "max_score", "version", "map"}`` with the encoded map when the item
    asked for an encoding, else the per-pixel scores at ``map_size`` (CPU float32) are in ``maps``; ``scores``
    holds the per-image maximum."""

    class_index: int | None = None
    probability: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prediction(self, labels: list[str]) -> dict[str, Any]:
        """``{"index", "label", "probability"}`` of the response."""
        index = self.class_index
        return {"index": index, "label": labels[index] if index is not None else None, "probability": self.probability}
