"""What the batch worker computes per batch: one forward, then every detector the batch's requests asked for, on
exactly the rows that asked for it, then the verdicts (:mod:`service.engine.verdicts`) and the score metrics.

Every image leaves the worker with its finished response entry; the event loop only assembles the answer (and,
for ``/segment``, encodes the maps). Score, verdict and p-value metrics are observed here, once per detector and
batch, and nowhere else (:class:`ScoreObserver`, implemented by :class:`service.metrics.ServiceMetrics`).

A batch is computed in two steps so the batcher can overlap them (:class:`service.engine.batcher.DynamicBatcher`'s
``prepare``): :func:`prepare_batch` stages the images on the device (any thread) and returns the rest of the work,
which runs in the batch worker; :func:`process_batch` does both in one go. Forward and detectors run under
``torch.inference_mode()`` (no autograd bookkeeping).

Besides the one-forward detectors (``predict_features`` on one output), the worker serves two kinds that need more:
``multi_features`` detectors (Gram, MultiMahalanobis) get the list of the ``nodes.layers`` outputs of the same
forward (Gram, via ``predict_structured``, also the served logits), and the detectors that run the network
themselves (``input_kind = "input"``: ODIN, MCD, MahalanobisODIN, GradNorm, GradUncertainty, NACUE) get the
batch's preprocessed inputs (:meth:`ServedModel.loop_inputs`, computed only when such a detector is selected) and
run ``predict`` on their rows outside inference mode, under ``torch.no_grad()``, enabling gradients where they need
them; the time each of these detectors takes per batch goes to :meth:`ScoreObserver.observe_detector_seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from service.engine.active import ActiveDetector
from service.engine.devices import Staged
from service.engine.items import ItemResult, ScoreItem
from service.engine.networks import layer_keys
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

    def observe_detector_seconds(self, model: str, detector: str, seconds: float) -> None:
        """Time a detector of :data:`SPECIAL_KINDS` (the network in the loop, or several layers) took on one batch."""


#: input kinds not scored from one output by ``predict_features`` (see the module docstring)
SPECIAL_KINDS = frozenset({"input", "multi_features"})


def process_batch(
    model: ServedModel, items: list[ScoreItem], observer: ScoreObserver | None = None
) -> list[ItemResult]:
    """The batcher's ``process`` (see :func:`service.engine.submit.attach_batcher`): runs in the worker thread."""
    return prepare_batch(model, items, observer)()


def prepare_batch(
    model: ServedModel, items: list[ScoreItem], observer: ScoreObserver | None = None
) -> Callable[[], list[ItemResult]]:
    """The batcher's ``prepare``: stage the batch's images on the device now (the prepare thread, while the
    previous batch computes) and return the rest of :func:`process_batch`, for the worker thread."""
    staged = model.stage([item.pixels for item in items])
    return partial(_score_staged, model, items, staged, observer)


def _detector_rows(items: list[ScoreItem]) -> list[tuple[ActiveDetector, list[int] | None]]:
    """Every detector the batch's items asked for, with the rows that asked for it (``None``: all rows)."""
    first = items[0].detectors
    if all(item.detectors == first for item in items):  # the usual case: one detector selection for the batch
        return [(active, None) for active in first]
    rows: dict[int, tuple[ActiveDetector, list[int]]] = {}
    for row, item in enumerate(items):
        for active in item.detectors:
            rows.setdefault(id(active), (active, []))[1].append(row)
    return list(rows.values())


def _score_staged(
    model: ServedModel, items: list[ScoreItem], staged: Staged, observer: ScoreObserver | None
) -> list[ItemResult]:
    if model.thread_plan is not None:  # the worker's intra-op threads for this batch size
        model.thread_plan.apply(len(items))
    with torch.inference_mode():
        outputs = model.forward_staged(staged)
        results = [ItemResult() for _ in items]
        classification = model.task == "classification"
        if classification:
            best, index = torch.softmax(outputs["logits"], dim=1).max(dim=1)
            for result, p, i in zip(results, best.tolist(), index.tolist(), strict=True):
                result.class_index, result.probability = i, p
        loop_inputs: list[Tensor] = []  # the preprocessed inputs, once a detector of kind "input" needs them
        for active, rows in _detector_rows(items):
            row_items = items if rows is None else [items[r] for r in rows]
            if active.input_kind in SPECIAL_KINDS:
                started = time.perf_counter()
                scores = _special_scores(model, staged, outputs, active, rows, loop_inputs)
                if observer is not None and any(item.record for item in row_items):
                    observer.observe_detector_seconds(model.name, active.name, time.perf_counter() - started)
            else:
                inputs = outputs[active.input_kind]
                selected = inputs if rows is None else inputs[torch.tensor(rows, device=inputs.device)]
                scores = active.detector.predict_features(selected).float().cpu()
            row_results = results if rows is None else [results[r] for r in rows]
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


def _special_scores(
    model: ServedModel,
    staged: Staged,
    outputs: dict[str, Tensor],
    active: ActiveDetector,
    rows: list[int] | None,
    loop_inputs: list[Tensor],
) -> Tensor:
    """Scores (CPU float32) of a ``multi_features`` or ``input`` detector on ``rows`` (``None``: all)."""
    detector = active.detector
    index = None if rows is None else torch.tensor(rows, device=outputs["logits"].device)
    if active.input_kind == "multi_features":
        layers = [outputs[key] if index is None else outputs[key][index] for key in layer_keys(model.config)]
        structured = getattr(detector, "predict_structured", None)
        if structured is None:
            return detector.predict_features(layers).float().cpu()  # type: ignore[arg-type]  # a list of layers
        logits = outputs["logits"] if index is None else outputs["logits"][index]
        return structured(logits, layers).float().cpu()
    with torch.inference_mode(False), torch.no_grad():
        if not loop_inputs:
            loop_inputs.append(model.loop_inputs(staged))  # outside inference mode: autograd may record on it
        x = loop_inputs[0] if index is None else loop_inputs[0][index]
        return detector.predict(x).float().cpu()


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
