"""Thresholds and conformal p-values of the batch worker, on a hand-computed calibration."""

from __future__ import annotations

import pytest
import torch

from ood_core.calibration import Calibration
from ood_core.detector import EnergyBased
from service.engine.active import ActiveDetector, StoredState
from service.engine.items import ItemResult, ScoreItem
from service.engine.verdicts import classification_verdicts, threshold_for


def test_threshold_and_conformal_p_values() -> None:
    detector = EnergyBased()
    detector.calibration = Calibration(torch.tensor([1.0, 2.0, 3.0, 4.0]), target_tpr=0.75)
    stored = StoredState("m", "e", 1, "0" * 64, 1, "EnergyBased", "2026-01-01T00:00:00Z")
    active = ActiveDetector("e", detector, stored)
    assert threshold_for(active, None, None) == 3.0  # smallest t with #{s <= t} / 4 >= 0.75
    assert threshold_for(active, None, 0.5) == 2.0
    assert threshold_for(active, 7.5, 0.5) == 7.5
    is_ood, p_values = _verdicts(active, torch.tensor([2.5, 3.0, 9.0], dtype=torch.float64), 3.0)
    assert is_ood == [False, False, True]
    # (1 + #{calibration >= s}) / (n + 1): 2.5 -> 3/5, 3.0 -> 3/5, 9.0 -> 1/5
    assert p_values == pytest.approx([0.6, 0.6, 0.2])
    detector.calibration = None
    assert threshold_for(active, None, None) is None
    assert _verdicts(active, torch.tensor([1.0]), None) == ([None], [None])


def _verdicts(active: ActiveDetector, scores: torch.Tensor, threshold: float | None) -> tuple[list, list]:  # type: ignore[type-arg]
    """``is_ood`` and ``p_value`` of each score, through the batch worker's vectorized verdicts."""
    items = [ScoreItem(torch.zeros(1), (active,), threshold=threshold) for _ in range(len(scores))]
    results = [ItemResult() for _ in items]
    classification_verdicts(active, items, results, scores)
    entries = [result.verdicts[active.name] for result in results]
    return [e["is_ood"] for e in entries], [e["p_value"] for e in entries]
