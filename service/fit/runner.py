"""Fit, calibrate and evaluate a detector over a streaming source, on one process or every torchrun rank.

:func:`run_fit`, in stages that every rank finishes before any goes on (:func:`~service.fit.dist.staged`):

1. **scan**: this rank's share of the source (:meth:`FitSource.scan`), every member checked;
2. **hold-out**: a stratified, seeded share of the ID samples for calibration (:mod:`service.fit.holdout`), the
   same for any number of ranks; OOD samples (``ood/``) are for evaluation only;
3. **fit**, for each of the detector's :attr:`~ood_core.api.Detector.fit_passes`: the rest of the ID samples
   through the model's forward into :meth:`~ood_core.api.Detector.partial_fit_features`, checkpointed every N
   images (:mod:`service.fit.checkpoint`), the ranks' statistics merged
   (:func:`ood_core.distributed.merge_across_ranks`), then :meth:`~ood_core.api.Detector.finish_pass`;
4. **calibrate**: the held-out ID samples' scores, gathered from every rank, give the
   :class:`~ood_core.calibration.Calibration` (threshold at the target TPR, conformal p-values); with OOD samples,
   :class:`~ood_core.metrics.OODMetrics` on held-out ID vs OOD scores (AUROC, AUPR-IN, AUPR-OUT, FPR95TPR);
5. the ``save_detector`` state, identical on every rank (the caller writes it; the CLI on rank 0).

With a grid in ``hparams`` (``{"grid": {"k": [1, 5, 50]}}``) the same stages fit every candidate on one stream and
keep the best by AUROC on ``ood/`` (:mod:`service.fit.grid`).

Test-only hooks (environment, read here and nowhere else): ``OOD_FIT_TEST_FAIL_RANK=<r>`` makes rank ``r`` raise
after its first fit batch; ``OOD_FIT_TEST_KILL_AFTER_CHECKPOINTS=<k>`` SIGKILLs the process right after its k-th
checkpoint. Nothing else reads them; the tests of :mod:`service.fit` use them to fail a rank and to kill a fit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ood_core.calibration import Calibration
from ood_core.metrics import OODMetrics
from ood_core.state import save_detector
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.fit import dist
from service.fit.checkpoint import Checkpointer, fingerprint
from service.fit.detectors import new_detector
from service.fit.holdout import calibration_mask, key_hashes
from service.fit.sources import FitSource, SourceIndex
from service.fit.stream import FitCancelled, FitProgress, Forward, Streamer
from service.fit.training import calibration_warning, check_options, fit_passes
from service.states.validate import external_modules

__all__ = ["FitCancelled", "FitHooks", "FitOptions", "FitProgress", "FitResult", "run_fit"]


@dataclass
class FitOptions:
    """What to fit and how (defaults as ``ood-fit``'s)."""

    detector_class: str
    hparams: dict[str, Any] = field(default_factory=dict)
    calibration_share: float = 0.1
    tpr: float = 0.95
    seed: int = 0
    batch_size: int = 64
    workers: int = 0
    skip_invalid: bool = False
    checkpoint_every: int | None = None
    checkpoint_path: Path | None = None
    resume: bool = False

    @classmethod
    def from_parameters(cls, parameters: Any, **others: Any) -> FitOptions:
        """The options named as a fit job's parameters (:data:`JOB_PARAMETERS`), read from the attributes of
        ``parameters`` (a job's ``FitParameters``, ``ood-fit``'s arguments), and ``others``; ``hparams`` copied."""
        values = {name: getattr(parameters, name) for name in JOB_PARAMETERS}
        return cls(**values | {"hparams": dict(values["hparams"])} | others)


JOB_PARAMETERS = ("detector_class", "hparams", "calibration_share", "tpr", "seed", "batch_size", "skip_invalid")
"""The options a fit job sets (``POST .../fit``); ``ood-fit`` sets these and the workers and checkpoints."""


@dataclass(frozen=True)
class FitHooks:
    """What the caller hooks into a fit: ``progress`` called after every batch, ``should_stop`` polled between
    batches (raises :class:`FitCancelled`), the ``forward`` (``None``: the model's own)."""

    progress: Callable[[FitProgress], None] | None = None
    should_stop: Callable[[], bool] | None = None
    forward: Forward | None = None


@dataclass
class FitResult:
    """The saved state and what went into it (totals over every rank). ``images``: images used (fit, calibration
    and evaluation, each once); ``skipped``: undecodable images skipped; ``metrics``: present when the data has
    OOD samples (classification)."""

    state: bytes
    images: int
    skipped: int
    calibration_size: int
    threshold: float
    target_tpr: float
    metrics: dict[str, float] | None
    warnings: list[str]
    fit_images: int = 0
    ood_images: int = 0
    resumed_images: int = 0
    """Images the statistics already held from a checkpoint when this run started."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """The fitted detector's constructor arguments (a grid's: the best candidate's)."""
    search: dict[str, Any] | None = None
    """A grid search's report (:meth:`service.fit.grid.FitGridSearch.report`): every candidate's row."""


def _test_hook_fail(ranks: dist.Ranks) -> None:
    if os.environ.get("OOD_FIT_TEST_FAIL_RANK") == str(ranks.rank):
        raise RuntimeError(f"test hook OOD_FIT_TEST_FAIL_RANK: rank {ranks.rank} fails")


def _test_hook_kill(checkpoints: int) -> None:
    if os.environ.get("OOD_FIT_TEST_KILL_AFTER_CHECKPOINTS") == str(checkpoints):
        os.kill(os.getpid(), signal.SIGKILL)


def run_fit(
    model: ServedModel,
    source: FitSource,
    options: FitOptions,
    *,
    progress: Callable[[FitProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    forward: Forward | None = None,
) -> FitResult:
    """Fit, calibrate and evaluate ``options.detector_class`` on ``source`` through ``model`` (module docstring).

    ``progress(FitProgress)`` is called after every batch; ``should_stop()`` is polled between batches and
    raises :class:`FitCancelled`; ``forward`` defaults to ``model.forward``. Raises :class:`DataSourceError` /
    :class:`BadRequestError` (400) for bad data or options, ``UnservableDetectorError`` (422) for a class the
    model cannot serve, :class:`~service.fit.dist.RankFailedError` when another rank failed."""
    check_options(options)
    from service.fit import grid  # grid imports this module

    hooks = FitHooks(progress, should_stop, forward)
    if grid.is_grid(options.hparams):
        return grid.run_grid(model, source, options, hooks)
    detector, kind = new_detector(model, options.detector_class, options.hparams)
    detector.to(model.device)
    if detector.requires_fit and model.task == "segmentation":
        raise BadRequestError(
            f"{options.detector_class} needs fitting on labelled images: not supported for this model"
        )
    run = prepare(model, source, options, kind, detector.fit_passes, hooks)
    ranks, index, stream = run.ranks, run.index, run.stream
    fit_id = fingerprint(
        {
            "model": model.name,
            "dims": model.dims,
            "class": options.detector_class,
            "hparams": options.hparams,
            "share": options.calibration_share,
            "seed": options.seed,
            "source": source.description,
            "rank": ranks.rank,
            "world": ranks.world,
        },
        index.keys,
        index.labels,
    )
    checkpoints = Checkpointer(options.checkpoint_path, options.checkpoint_every, ranks, fit_id)
    modules = external_modules(model, type(detector), kind)
    detector, resumed = fit_passes(
        detector, stream, run.fit_ordinals, checkpoints, modules, ranks, options, _test_hook_fail, _test_hook_kill
    )
    scores, labels = dist.staged(ranks, "calibrating", lambda: _score(detector, stream, run.eval_ordinals))
    scores, labels = dist.gather(ranks, scores), dist.gather(ranks, labels)
    result = finish_fit(
        detector, scores, labels, options, model.task, run, fitted=detector.fit_passes > 0, resumed=resumed
    )
    checkpoints.remove()
    return result


@dataclass
class PreparedFit:
    """A fit after its scan and hold-out: this rank's index, the streamer, and the local ordinals to fit on (ID,
    not held out) and to evaluate (held-out ID and ``ood/``)."""

    ranks: dist.Ranks
    index: SourceIndex
    stream: Streamer
    fit_ordinals: Tensor
    eval_ordinals: Tensor


def prepare(
    model: ServedModel,
    source: FitSource,
    options: FitOptions,
    kind: str,
    passes: int,
    hooks: FitHooks,
) -> PreparedFit:
    """Scan ``source`` (every rank its share), hold out the calibration share and set up the streamer of the
    ``kind`` outputs with ``hooks``; ``passes`` over the fit images (0: none) set the progress total."""
    progress = hooks.progress
    ranks = dist.current()
    source.use_output(kind, model.dims[kind])
    if progress is not None:
        progress(FitProgress(0, None, 0, 0.0, None, "scanning"))
    source.warnings.clear()  # a source's warnings are about its latest scan
    index = dist.staged(ranks, "scanning the data", lambda: source.scan(ranks.rank, ranks.world))
    stream = Streamer(
        model,
        source,
        index,
        kind,
        batch_size=options.batch_size,
        workers=options.workers,
        skip_invalid=options.skip_invalid or source.skip_invalid,
        forward=hooks.forward or model.forward,
        progress=progress,
        should_stop=hooks.should_stop,
    )
    held_out = calibration_mask(
        key_hashes(index.keys, options.seed), index.labels, options.calibration_share, lambda t: dist.gather(ranks, t)
    )
    fit_ordinals = torch.nonzero((index.labels >= 0) & ~held_out).flatten()
    eval_ordinals = torch.nonzero(held_out | (index.labels < 0)).flatten()
    stream.total = len(fit_ordinals) * passes + len(eval_ordinals)
    return PreparedFit(ranks, index, stream, fit_ordinals, eval_ordinals)


def count_images(result: FitResult, run: PreparedFit, *, fitted: bool, resumed: int = 0) -> None:
    """Fill ``result``'s image counts (totals over the ranks) and the source's and skip warnings."""
    ranks, index, stream = run.ranks, run.index, run.stream
    result.skipped = dist.total(ranks, int(stream.skipped.sum()))
    used = len(index) if fitted else len(run.eval_ordinals)  # a detector without a fit reads no fit images
    result.images = dist.total(ranks, used) - result.skipped
    fit_images = len(run.fit_ordinals) - int(stream.skipped[run.fit_ordinals].sum()) if fitted else 0
    result.fit_images = dist.total(ranks, fit_images)
    result.ood_images = dist.total(ranks, int((index.labels < 0).sum() - stream.skipped[index.labels < 0].sum()))
    result.resumed_images = dist.total(ranks, resumed)
    result.warnings = [*run.stream.source.warnings, *result.warnings]
    if result.skipped:
        result.warnings.append(f"{result.skipped} undecodable image(s) skipped")


def _score(detector: Any, stream: Streamer, ordinals: Tensor) -> tuple[Tensor, Tensor]:
    """Scores (per image, or per pixel flattened per image for segmentation) and labels of ``ordinals``."""
    stream.phase = "calibrating"
    scores: list[Tensor] = []
    labels: list[Tensor] = []
    with torch.no_grad():
        for batch, outputs in stream.batches(ordinals):
            s = detector.predict_features(outputs).float().cpu()
            scores.append(s.reshape(s.shape[0], -1))
            labels.append(batch.labels)
    if not scores:
        return torch.empty(0, 1), torch.empty(0, dtype=torch.int64)
    width = scores[0].shape[1]
    return torch.cat([s.reshape(-1, width) for s in scores]), torch.cat(labels)


def finish_fit(
    detector: Any,
    scores: Tensor,
    labels: Tensor,
    options: FitOptions,
    task: str,
    run: PreparedFit,
    *,
    fitted: bool,
    resumed: int = 0,
) -> FitResult:
    """The saved state of fitted ``detector`` with its calibration on the held-out ID ``scores`` and, with OOD
    ``labels`` (classification), :class:`~ood_core.metrics.OODMetrics` on held-out ID vs OOD; the image counts of
    ``run`` (:func:`count_images`)."""
    held_out = scores[labels >= 0]
    if held_out.numel() == 0:
        raise BadRequestError("no held-out ID image could be scored: nothing to calibrate on")
    calibration = Calibration.from_scores(held_out, target_tpr=options.tpr)
    metrics = None
    if task == "classification" and bool((labels < 0).any()):
        metrics = OODMetrics().update(scores[:, 0].double(), labels).compute()
    result = FitResult(
        state=save_detector(detector, calibration=calibration),
        images=0,
        skipped=0,
        calibration_size=int((labels >= 0).sum()),
        threshold=calibration.threshold(),
        target_tpr=options.tpr,
        metrics=metrics,
        warnings=calibration_warning(calibration.n, options.tpr),
        hparams=dict(options.hparams),
    )
    count_images(result, run, fitted=fitted, resumed=resumed)
    return result
