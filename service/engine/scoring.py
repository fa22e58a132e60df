"""What the batch worker computes per batch: one forward, then every detector the batch's requests asked for, on
exactly the rows that asked for it, then the verdicts (:mod:`service.engine.verdicts`) and the score metrics.

Every image leaves the worker with its finished response entry; the event loop only assembles the answer (and,
for ``/segment``, encodes the maps). Score, verdict and p-value metrics are observed here, once per detector and
batch, and nowhere else (:class:`ScoreObserver`, implemented by :class:`service.metrics.ServiceMetrics`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from service.engine.active import ActiveDetector
from service.engine.items import ItemResult, ScoreItem
from service.engine.preprocess import Preprocessor
from service.engine.served_model import ServedModel
from service.engine.verdicts import classification_verdicts, segmentation_verdicts


class ScoreObserver(Protocol):
    """Receives the scores of every batch the worker finished (e.g. to feed Prometheus)."""

    def observe_images(self, model: str, task: str, count: int) -> None:
        """``count`` images of ``model`` (a ``classification`` or ``segmentation`` model) were scored."""

    def observe_scores(
        self,
        model: str,
        detector: str,
        scores: list[float],
        is_ood: list[bool | None],
        p_values: list[float | None],
    ) -> None:
        """One detector's per-image scores (segmentation: the maximum), verdicts and p-values for one batch."""


def process_batch(
    model: ServedModel, items: list[ScoreItem], observer: ScoreObserver | None = None
) -> list[ItemResult]:
    """The batcher's ``process`` (see :func:`service.engine.submit.attach_batcher`): runs in the worker thread."""
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
        row_items, row_results = [items[r] for r in rows], [results[r] for r in rows]
        if classification:
            classification_verdicts(active, row_items, row_results, scores)
        else:
            maps = [
                Preprocessor.resize_map(score, item.map_size or (int(score.shape[-2]), int(score.shape[-1])))
                for item, score in zip(row_items, scores, strict=True)
            ]
            segmentation_verdicts(active, row_items, row_results, maps)
        if observer is not None:
            _observe(observer, model.name, active.name, row_items, row_results)
    if observer is not None:
        recorded = sum(1 for item in items if item.record)
        if recorded:
            observer.observe_images(model.name, model.task, recorded)
    return results


def _observe(
    observer: ScoreObserver, model: str, detector: str, items: list[ScoreItem], results: list[ItemResult]
) -> None:
    scores: list[float] = []
    is_ood: list[bool | None] = []
    p_values: list[float | None] = []
    for item, result in zip(items, results, strict=True):
        if not item.record:
            continue
        verdict = result.verdicts[detector]
        scores.append(result.scores[detector])
        if "is_ood" in verdict:
            is_ood.append(verdict["is_ood"])
            p_values.append(verdict["p_value"])
        else:  # segmentation: OOD when some pixel is above the threshold; no p-value
            share = verdict["ood_share"]
            is_ood.append(None if share is None else share > 0)
            p_values.append(None)
    if scores:
        observer.observe_scores(model, detector, scores, is_ood, p_values)
