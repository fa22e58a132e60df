"""A grid search inside a fit: every candidate fitted on one stream, evaluated on held-out ID vs ``ood/``, the best
by AUROC installed, every candidate reported.

**The grid in ``hparams``.** The reserved key ``grid`` holds an object of constructor argument -> list of candidate
values; the other keys are fixed for every candidate::

    {"grid": {"k": [1, 5, 50]}, "normalize": true}   # 3 candidates: k=1, k=5, k=50, each with normalize=true

Without a ``grid`` key ``hparams`` are plain constructor arguments (no detector has an argument named ``grid``); a
name may not be both fixed and in the grid; the candidates are the product of the lists (the last name varying
fastest), at most :data:`MAX_CANDIDATES`. It takes the data's ``ood/`` images (OOD labels): without them there is
nothing to rank by, and the fit is refused with a :class:`~service.fit.sources.DataSourceError` (400).

**One stream.** The data is read as for a single fit (:func:`service.fit.runner.prepare`: the same scan and the same
stratified, seeded calibration hold-out), and every batch goes through the model's forward *once*: its outputs are
folded into every candidate's statistics (:meth:`~ood_core.api.Detector.partial_fit_features`), pass after pass
while any candidate asks for another, and the held-out ID and ``ood/`` batches are scored by every candidate. Memory
is that of one single fit per candidate: bounded statistics for the statistics-based detectors (Mahalanobis: a
``D x D`` matrix each), a feature bank per candidate for the buffering ones (KNN); the evaluation keeps one score per
held-out image per candidate.

**Ranking and report** are :class:`ood_core.search.GridSearch`'s (subclassed: its candidates, rows, ``_better`` and
``report``): the metric is :class:`~ood_core.metrics.OODMetrics`' AUROC on held-out ID vs ``ood/`` scores, the best
finite score wins and ties keep the earlier candidate. A candidate that cannot be built, fitted or scored gets a row
with its ``error`` and the others go on; the fit fails (400) only when no candidate is left. The best one's
calibration, threshold and metrics are those a single fit with its hyperparameters gives (same images, same
hold-out). Grids run on one process, without checkpoints, for classification models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError
from ood_core.search import CANDIDATE_ERRORS, GridSearch
from ood_core.state import detector_class
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.fit import dist
from service.fit.detectors import new_detector
from service.fit.runner import FitHooks, FitOptions, FitResult, PreparedFit, finish_fit, prepare
from service.fit.sources import DataSourceError, FitSource
from service.states.validate import check_servable

__all__ = ["GRID_KEY", "MAX_CANDIDATES", "FitGridSearch", "check_grid", "is_grid", "run_grid", "split_grid"]

GRID_KEY = "grid"
MAX_CANDIDATES = 64
"""Most candidates one fit may search (each holds its own fitted state while the stream runs)."""


def is_grid(hparams: Any) -> bool:
    """Whether ``hparams`` describe a grid (they have the reserved key ``grid``)."""
    return isinstance(hparams, dict) and GRID_KEY in hparams


def split_grid(hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``(fixed, grid)`` of grid ``hparams``; 400 for a grid that is not a non-empty object of lists or that
    repeats a fixed name."""
    grid = hparams[GRID_KEY]
    example = '{"grid": {"k": [1, 5, 50]}}'
    if not isinstance(grid, dict) or not grid:
        raise BadRequestError(f"hparams.grid must be a non-empty object of name -> list of values, e.g. {example}")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BadRequestError(f"hparams.grid.{name} must be a non-empty list of candidate values, e.g. {example}")
    fixed = {k: v for k, v in hparams.items() if k != GRID_KEY}
    both = sorted(set(fixed) & set(grid))
    if both:
        raise BadRequestError(f"hparams {both} are both fixed and in the grid: give each name once")
    return fixed, {name: list(values) for name, values in grid.items()}


class FitGridSearch(GridSearch):
    """:class:`~ood_core.search.GridSearch` over a served model's detector: candidates built with its networks
    (:func:`~service.fit.detectors.new_detector`), rows added as the stream finishes them (:meth:`add`)."""

    def __init__(self, model: ServedModel, class_name: str, hparams: dict[str, Any]) -> None:
        fixed, space = split_grid(hparams)
        try:
            cls = detector_class(class_name)
        except InvalidStateError as exc:
            raise BadRequestError(str(exc)) from exc
        try:
            super().__init__(cls, None, [], space, fixed=fixed)
        except ValueError as exc:
            raise BadRequestError(f"bad hparams.grid: {exc}") from exc
        count = math.prod(len(values) for values in self.space.values())
        if count > MAX_CANDIDATES:
            raise BadRequestError(f"hparams.grid has {count} candidates; at most {MAX_CANDIDATES} per fit")
        self.model = model

    def hparams_of(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A candidate's constructor arguments: the fixed ones and its grid values."""
        return {**self.fixed, **params}

    def build(self, params: Mapping[str, Any]) -> Detector:
        detector, _ = new_detector(self.model, self.detector_class.__name__, self.hparams_of(params))
        return detector.to(self.model.device)

    def evaluate(self, scores: Tensor, labels: Tensor) -> dict[str, float]:
        """The metrics of image scores (ValueError for non-finite ones), as :meth:`GridSearch.run` computes them."""
        return self._evaluate(scores, labels)

    def add(self, params: dict[str, Any], metrics: dict[str, float] | None, error: str | None, seconds: float) -> bool:
        """Append a candidate's row (as :meth:`GridSearch.run` does); whether it is the best so far."""
        row: dict[str, Any] = {"params": params, "hparams": self.hparams_of(params), "score": None, "metrics": {}}
        row["error"], row["seconds"] = error, round(seconds, 6)
        best = False
        if metrics is not None:
            score = metrics[self.metric_name]
            row["metrics"] = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
            if not math.isfinite(score):
                row["error"] = f"{self.metric_name} is not finite"
            else:
                row["score"] = score
                best = self._better(score)
                if best:
                    self.best_params_, self.best_score_ = params, score
        self.results_.append(row)
        return best

    def report(self) -> dict[str, Any]:
        out = super().report()
        if out["best"] is not None:
            out["best"]["hparams"] = self.hparams_of(out["best"]["params"])
        return out


@dataclass(eq=False)
class Candidate:
    """One combination of the grid while the stream runs (``detector`` dropped once it failed)."""

    params: dict[str, Any]
    detector: Detector | None = None
    error: str | None = None
    seconds: float = 0.0
    scores: list[Tensor] = field(default_factory=list)
    fitting: bool = False

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` timed; a candidate error marks the candidate failed and returns ``None``."""
        start = time.perf_counter()
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except BadRequestError as exc:
            self.fail(exc.detail)
            return None
        except CANDIDATE_ERRORS as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.seconds += time.perf_counter() - start

    def fail(self, reason: str) -> None:
        self.error, self.detector, self.scores, self.fitting = reason, None, [], False


def check_grid(model: ServedModel, class_name: str, hparams: dict[str, Any]) -> FitGridSearch:
    """The checks a grid fit makes before reading any data: 400 for a bad grid, a model that is not a classifier,
    or a grid none of whose candidates can be built; 422 for a class the model cannot serve."""
    search = FitGridSearch(model, class_name, hparams)
    check_servable(model, search.detector_class)
    if model.task != "classification":
        raise BadRequestError("a grid search ranks candidates by image AUROC: only for classification models")
    errors = []
    for params in search.candidates():
        candidate = Candidate(params)
        if candidate.call(search.build, params) is not None:
            return search
        errors.append(f"{params}: {candidate.error}")
    raise BadRequestError("no candidate of hparams.grid can be built: " + "; ".join(errors))


def run_grid(
    model: ServedModel,
    source: FitSource,
    options: FitOptions,
    hooks: FitHooks,
) -> FitResult:
    """:func:`~service.fit.runner.run_fit` for grid ``options.hparams`` (module docstring): the best candidate's
    state and metrics, with ``hparams`` (its constructor arguments) and ``search`` (the report of every one)."""
    if dist.current().distributed:
        raise BadRequestError("a grid search (hparams.grid) runs on one process: run it without torchrun")
    if options.checkpoint_every is not None or options.resume:
        raise BadRequestError("a grid search (hparams.grid) takes no checkpoints: run it without them")
    search = check_grid(model, options.detector_class, options.hparams)
    kind = check_servable(model, search.detector_class)
    candidates = [Candidate(params) for params in search.candidates()]
    for candidate in candidates:
        candidate.detector = candidate.call(search.build, candidate.params)
    built = [c.detector for c in candidates if c.detector is not None]
    passes = max(d.fit_passes for d in built)
    run = prepare(model, source, options, kind, passes, hooks)
    if dist.total(run.ranks, int((run.index.labels < 0).sum())) == 0:
        raise DataSourceError(
            "a grid search ranks its candidates by AUROC on held-out ID vs OOD images: the data has no ood/ "
            "folder (or OOD labels); add OOD images under ood/"
        )
    _fit(candidates, run, passes)
    labels = _score(candidates, run)
    if not bool((labels < 0).any()):
        raise DataSourceError("no ood/ image could be scored: nothing to rank the grid's candidates by")
    best: Candidate | None = None
    for candidate in candidates:
        metrics = None
        if candidate.detector is not None:
            scores = torch.cat(candidate.scores)
            metrics = candidate.call(search.evaluate, scores[:, 0].double(), labels)
        if search.add(candidate.params, metrics, candidate.error, candidate.seconds):
            best = candidate
    if best is None or best.detector is None:
        reasons = "; ".join(f"{row['params']}: {row['error']}" for row in search.results_)
        raise BadRequestError(f"no candidate of hparams.grid could be fitted and evaluated: {reasons}")
    result = finish_fit(best.detector, torch.cat(best.scores), labels, options, model.task, run, fitted=passes > 0)
    result.hparams, result.search = search.hparams_of(best.params), search.report()
    return result


def _fit(candidates: list[Candidate], run: PreparedFit, passes: int) -> None:
    """Every candidate's passes over the fit images, each batch's outputs computed once for all of them."""
    stream = run.stream
    for candidate in candidates:
        if candidate.detector is not None and candidate.detector.fit_passes > 0:
            candidate.fitting = candidate.call(candidate.detector.begin_fit) is not None
    number = 0
    while any(c.fitting for c in candidates):
        number += 1
        stream.phase = "fitting" if passes == 1 else f"fitting pass {number} of {passes}"
        todo = run.fit_ordinals[~stream.skipped[run.fit_ordinals]]
        for batch, outputs in stream.batches(todo):
            labels = batch.labels.to(outputs.device)
            for c in candidates:
                if c.fitting and c.detector is not None:
                    c.call(c.detector.partial_fit_features, outputs, labels)
        for c in candidates:
            if c.fitting and c.detector is not None:
                finished = c.call(c.detector.finish_pass)
                c.fitting = c.detector is not None and finished is False


def _score(candidates: list[Candidate], run: PreparedFit) -> Tensor:
    """Every standing candidate's scores of the held-out ID and ``ood/`` images (``candidate.scores``, one row
    per image); the labels."""
    stream = run.stream
    stream.phase = "calibrating"
    labels: list[Tensor] = []
    with torch.no_grad():
        for batch, outputs in stream.batches(run.eval_ordinals):
            labels.append(batch.labels)
            for c in candidates:
                if c.detector is not None:
                    s = c.call(c.detector.predict_features, outputs)
                    if s is not None:
                        c.scores.append(s.float().cpu().reshape(len(batch), -1))
    for c in candidates:
        if c.detector is not None and not c.scores:
            c.fail("no held-out image could be scored")
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
