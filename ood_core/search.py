"""Hyperparameter grid search for detectors on held-out ID + OOD validation data (pytorch-ood's ``GridSearch``).

The protocol is OpenOOD's automatic parameter search: every combination of the grid is built, fitted on the ID fit
data and scored on a validation set with ID (labels ``>= 0``) and OOD (labels ``< 0``) samples; the combination with
the best metric (AUROC by default) wins. Network outputs are computed *once*: pass them directly (``(outputs,
labels)``, as a fit job does) or pass loaders of ``(x, y)`` batches, which are run through the network a single
time (:mod:`ood_core.search_outputs`). Only detectors that need the network in the loop (``input_kind ==
"input"``: ODIN, MCD, ...) are re-run on the loaders for each candidate.

.. code-block:: python

    search = GridSearch(KNN, (z_fit, y_fit), (z_val, y_val), {"k": [1, 5, 50], "normalize": [True]})
    best = search.run()  # {"k": 50, "normalize": True}
    search.best_detector_  # fitted with the best hyperparameters
    search.report()  # JSON: the metric, the best row and one row per candidate

Differences from pytorch-ood 0.4.0: ``detector`` may be a class (with ``modules`` for its networks and ``fixed`` for
other constructor arguments) or an instance, whose :meth:`~ood_core.api.Detector.hparams` and networks are the base
of every candidate; the instance is *not* changed (detectors here have no ``set_hyperparameters``): the fitted best
is :attr:`GridSearch.best_detector_`. A candidate that cannot be built, fitted or scored (bad hyperparameters, a
singular fit, non-finite scores) gets a row with its ``error`` instead of ending the search.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector
from ood_core.errors import OODError
from ood_core.metrics import OODMetrics
from ood_core.search_outputs import Data, Outputs, is_outputs, prepare_outputs, scores_from_outputs

__all__ = ["GridSearch"]

#: errors that disqualify one candidate; anything else (a bug, CUDA out of memory) ends the search
CANDIDATE_ERRORS = (ValueError, TypeError, ArithmeticError, OODError, RuntimeError, NotImplementedError)


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


class GridSearch:
    """Search ``hyperparameter_space`` (name -> candidate values) for the detector that scores best on ``val_data``.

    :param detector: a :class:`~ood_core.api.Detector` class, or an instance whose ``hparams()`` and networks are
        the base of every candidate
    :param fit_data: ID data to fit each candidate on: ``(outputs, labels)`` (outputs a tensor, or a list of
        tensors for multi-layer detectors) or a loader of ``(x, y)``; ``None`` for detectors without a fit
    :param val_data: validation data with ID and OOD samples, in either form
    :param hyperparameter_space: the grid; default: the detector's ``hyperparameter_space`` attribute
    :param metric: object with ``reset()``, ``update(scores, labels)`` and ``compute() -> dict``; default
        :class:`~ood_core.metrics.OODMetrics` (AUROC, AUPR-IN, AUPR-OUT, FPR95TPR)
    :param metric_name: key of ``metric.compute()`` to optimize
    :param higher_is_better: maximize (``True``, AUROC) or minimize (FPR95TPR, AUTC) the metric
    :param device: where outputs, detectors and scores live; ``None``: where the data are
    :param modules: networks for the constructor (``model``, ``backbone``, ``head``...), if ``detector`` is a class
    :param fixed: constructor arguments shared by all candidates (overridden by the grid)
    :param batch_size: validation rows scored at a time
    :raises ValueError: on an empty grid, a grid value that is not JSON, or a metric name the metric lacks (at
        :meth:`run`)
    """

    def __init__(
        self,
        detector: type[Detector] | Detector,
        fit_data: Data | None,
        val_data: Data,
        hyperparameter_space: Mapping[str, Sequence[Any]] | None = None,
        metric: Any = None,
        metric_name: str = "AUROC",
        higher_is_better: bool = True,
        device: str | torch.device | None = None,
        *,
        modules: Mapping[str, Any] | None = None,
        fixed: Mapping[str, Any] | None = None,
        batch_size: int = 4096,
    ) -> None:
        if isinstance(detector, Detector):
            self.detector_class: type[Detector] = type(detector)
            base_modules = {name: getattr(detector, name, None) for name in type(detector).external_modules}
            base_hparams = detector.hparams()
        else:
            self.detector_class, base_modules, base_hparams = detector, {}, {}
        self.modules = {**base_modules, **(modules or {})}
        self.fixed = {**base_hparams, **(fixed or {})}
        space = hyperparameter_space if hyperparameter_space is not None else self._default_space()
        if not space:
            raise ValueError(f"{self.detector_class.__name__}: the hyperparameter space is empty; pass one")
        for name, values in space.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"hyperparameter {name!r} needs a non-empty list of candidate values")
        self.space = {name: list(values) for name, values in space.items()}
        try:
            json.dumps(self.space, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"hyperparameter values must be JSON values (numbers, strings, lists...): {exc}") from exc
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.fit_data, self.val_data = fit_data, val_data
        self.metric = OODMetrics() if metric is None else metric
        self.metric_name = metric_name
        self.higher_is_better = higher_is_better
        self.device = None if device is None else torch.device(device)
        self.batch_size = batch_size
        self.best_params_: dict[str, Any] | None = None  #: the best combination
        self.best_score_: float | None = None  #: its validation metric
        self.best_detector_: Detector | None = None  #: a detector fitted with it
        self.results_: list[dict[str, Any]] = []  #: one row per candidate, in grid order (see :meth:`run`)

    def _default_space(self) -> Mapping[str, Sequence[Any]]:
        space = getattr(self.detector_class, "hyperparameter_space", None)
        return space if isinstance(space, Mapping) else {}

    def candidates(self) -> Iterator[dict[str, Any]]:
        """Every combination of the grid, the last name varying fastest."""
        names = list(self.space)
        for values in itertools.product(*(self.space[name] for name in names)):
            yield dict(zip(names, values, strict=True))

    def build(self, params: Mapping[str, Any]) -> Detector:
        """An unfitted detector with ``params`` over the fixed arguments and networks."""
        detector = self.detector_class(**self.modules, **{**self.fixed, **params})
        return detector if self.device is None else detector.to(self.device)

    # ------------------------------------------------------------------ data
    def _prototype(self, params_list: list[dict[str, Any]]) -> Detector | None:
        """The first candidate that can be built: its network produces the outputs shared by all candidates
        (the network step must not depend on the searched hyperparameters)."""
        for params in params_list:
            try:
                return self.build(params)
            except CANDIDATE_ERRORS:
                continue
        return None

    def _prepare(self, prototype: Detector, data: Data) -> tuple[Outputs, Tensor]:
        return prepare_outputs(prototype, data, self.device)

    # ------------------------------------------------------------------ scoring
    def _evaluate(self, scores: Tensor, labels: Tensor) -> dict[str, float]:
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("the detector gave non-finite scores")
        self.metric.reset()
        self.metric.update(scores, labels.to(scores.device))
        result = {key: float(value) for key, value in self.metric.compute().items()}
        if self.metric_name not in result:
            raise KeyError(f"metric_name {self.metric_name!r} is not computed by the metric; it has {sorted(result)}")
        return result

    def _score_in_loop(self, detector: Detector) -> dict[str, float]:
        """Network-in-the-loop detectors: fit on and predict through the loaders."""
        if detector.requires_fit:
            detector.fit(self.fit_data, device=self.device)  # type: ignore[arg-type]
        scores, labels = [], []
        for batch in self.val_data:  # type: ignore[union-attr]
            x = batch[0] if self.device is None else batch[0].to(self.device)
            scores.append(detector.predict(x).detach())
            labels.append(torch.as_tensor(batch[1]))
        return self._evaluate(torch.cat(scores), torch.cat(labels))

    # ------------------------------------------------------------------ the search
    def run(self) -> dict[str, Any]:
        """Fit and score every candidate.

        Each row of :attr:`results_` holds ``params``, ``score`` (the optimized metric, ``None`` if the candidate
        failed), ``metrics`` (everything the metric computed), ``error`` (``None`` or the reason the candidate
        failed) and ``seconds``. The best finite score wins; ties keep the earlier candidate.

        :return: the best hyperparameters (also :attr:`best_params_`; :attr:`best_detector_` is fitted with them)
        :raises ValueError: if no candidate produced a finite score (:attr:`results_` still has every row), if a
            detector that needs fitting gets no ``fit_data``, or if the data do not suit the detector
        :raises KeyError: if the metric does not compute ``metric_name``
        """
        params_list = list(self.candidates())
        cls = self.detector_class
        if cls.requires_fit and self.fit_data is None:
            raise ValueError(f"{cls.__name__} needs fitting: pass fit_data")
        in_loop = cls.input_kind == "input"
        if in_loop and (is_outputs(self.val_data) or (self.fit_data is not None and is_outputs(self.fit_data))):
            raise ValueError(f"{cls.__name__} needs the network in the loop: pass loaders of (x, y)")
        fit: tuple[Outputs, Tensor] | None = None
        val: tuple[Outputs, Tensor] | None = None
        if not in_loop:
            prototype = self._prototype(params_list)  # runs the network; None if no candidate can be built
            if prototype is not None:
                if cls.requires_fit:
                    fit = self._prepare(prototype, self.fit_data)  # type: ignore[arg-type]
                val = self._prepare(prototype, self.val_data)
                if not (bool((val[1] < 0).any()) and bool((val[1] >= 0).any())):
                    raise ValueError("val_data must contain ID (label >= 0) and OOD (label < 0) samples")
            del prototype

        self.results_, self.best_params_, self.best_score_, self.best_detector_ = [], None, None, None
        for params in params_list:
            row: dict[str, Any] = {"params": params, "score": None, "metrics": {}, "error": None}
            start = time.perf_counter()
            try:
                detector = self.build(params)
                if in_loop:
                    metrics = self._score_in_loop(detector)
                else:
                    if fit is not None:
                        detector.fit_features(*fit)
                    assert val is not None  # the detector was built, so the prototype was too
                    metrics = self._evaluate(scores_from_outputs(detector, val[0], self.batch_size), val[1])
            except torch.cuda.OutOfMemoryError:
                raise
            except CANDIDATE_ERRORS as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            else:
                score = metrics[self.metric_name]
                row["metrics"] = {key: _finite_or_none(value) for key, value in metrics.items()}
                if math.isfinite(score):
                    row["score"] = score
                    if self._better(score):
                        self.best_params_, self.best_score_, self.best_detector_ = params, score, detector
                else:
                    row["error"] = f"{self.metric_name} is not finite"
            row["seconds"] = time.perf_counter() - start
            self.results_.append(row)
        if self.best_params_ is None:
            raise ValueError(
                "no hyperparameter combination produced a finite score: "
                + "; ".join(f"{row['params']}: {row['error']}" for row in self.results_)
            )
        return dict(self.best_params_)

    def _better(self, score: float) -> bool:
        if self.best_score_ is None:
            return True
        return score > self.best_score_ if self.higher_is_better else score < self.best_score_

    def report(self) -> dict[str, Any]:
        """The search as JSON-serializable data (no NaN): ``detector``, ``metric``, ``higher_is_better``, ``best``
        (``{"params", "score"}`` or ``None``) and ``results`` (the rows of :meth:`run`)."""
        best = None if self.best_params_ is None else {"params": self.best_params_, "score": self.best_score_}
        return {
            "detector": self.detector_class.__name__,
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "best": best,
            "results": [dict(row) for row in self.results_],
        }
