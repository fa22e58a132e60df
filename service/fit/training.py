"""The fit passes of :func:`service.fit.runner.run_fit`: stream, checkpoint, merge across ranks, finish; resume.

A pass folds the batches of this rank's fit samples into the detector's statistics
(:meth:`~ood_core.api.Detector.partial_fit_features`), marking each sample consumed; a checkpoint holds the
statistics with that mask, so a resumed fit reads only what the statistics do not hold yet. At the end of a pass
(every rank done) the statistics are merged across ranks and the pass finished; the detector may ask for
another pass over the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError
from service.errors import BadRequestError
from service.fit import dist
from service.fit.checkpoint import Checkpointer
from service.fit.stream import Streamer

if TYPE_CHECKING:
    from service.fit.runner import FitOptions


def check_options(options: FitOptions) -> None:
    """400 for options no fit can run with."""
    if not isinstance(options.hparams, dict):
        raise BadRequestError("hparams must be a JSON object")
    if not 0.0 < options.calibration_share < 1.0:
        raise BadRequestError(f"calibration_share must be in (0, 1), got {options.calibration_share}")
    if not 0.0 < options.tpr <= 1.0:
        raise BadRequestError(f"tpr must be in (0, 1], got {options.tpr}")
    if options.batch_size < 1 or options.workers < 0:
        raise BadRequestError("batch_size must be at least 1 and workers at least 0")
    if options.checkpoint_every is not None and options.checkpoint_every < 1:
        raise BadRequestError("checkpoint_every must be at least 1")
    if (options.checkpoint_every is not None or options.resume) and options.checkpoint_path is None:
        raise BadRequestError("checkpoints (checkpoint_every, resume) need a checkpoint_path")


def calibration_warning(scores: int, tpr: float) -> list[str]:
    """A warning when fewer than ``1 / (1 - tpr)`` calibration scores (images; pixels for segmentation) leave the
    threshold at the largest of them."""
    if tpr >= 1.0 or scores >= 1.0 / (1.0 - tpr):
        return []
    need = math.ceil(1.0 / (1.0 - tpr) - 1e-9)
    return [
        f"calibration set of {scores} score(s) is too small for a {tpr:.0%} TPR threshold (at least {need} "
        "needed): the threshold is the largest calibration score"
    ]


def _resume(
    detector: Detector, stream: Streamer, checkpoints: Checkpointer, modules: dict[str, Any], ranks: dist.Ranks
) -> tuple[Detector, Tensor]:
    n = len(stream.index)
    loaded = dist.staged(ranks, "loading checkpoints", lambda: checkpoints.load(n, modules))
    passes = dist.gather(ranks, torch.tensor([loaded.detector.fit_pass if loaded else -1]))
    if int(passes.min()) != int(passes.max()):
        raise BadRequestError(
            f"the ranks' checkpoints are of different passes ({passes.tolist()}, -1: none): run without --resume"
        )
    if loaded is None:
        return detector, torch.zeros(n, dtype=torch.bool)
    stream.skipped, stream.skipped_count = loaded.skipped, int(loaded.skipped.sum())
    return loaded.detector.to(stream.model.device), loaded.consumed


def fit_passes(
    detector: Detector,
    stream: Streamer,
    fit_ordinals: Tensor,
    checkpoints: Checkpointer,
    modules: dict[str, Any],
    ranks: dist.Ranks,
    options: FitOptions,
    fail_hook: Callable[[dist.Ranks], None],
    kill_hook: Callable[[int], None],
) -> tuple[Detector, int]:
    """Run the detector's passes over ``fit_ordinals``; returns the fitted detector and how many images a
    checkpoint already held."""
    passes = detector.fit_passes
    if passes == 0:
        return detector, 0
    consumed = torch.zeros(len(stream.index), dtype=torch.bool)
    if options.resume:
        detector, consumed = _resume(detector, stream, checkpoints, modules, ranks)
    resumed = int(consumed.sum()) + detector.fit_pass * len(fit_ordinals)
    stream.done = resumed
    stream.report()
    while True:
        number = detector.fit_pass + 1
        stream.phase = "fitting" if passes == 1 else f"fitting pass {number} of {passes}"
        todo = fit_ordinals[~consumed[fit_ordinals] & ~stream.skipped[fit_ordinals]]

        def one_pass(todo: Tensor = todo) -> None:
            for i, (batch, outputs) in enumerate(stream.batches(todo)):
                detector.partial_fit_features(outputs, batch.labels.to(outputs.device))
                consumed[batch.ordinals] = True
                if checkpoints.after(len(batch), detector, consumed, stream.skipped):
                    kill_hook(checkpoints.written)
                if i == 0:
                    fail_hook(ranks)
            checkpoints.save(detector, consumed, stream.skipped)
            kill_hook(checkpoints.written)

        dist.staged(ranks, f"fitting (pass {number} of {passes})", one_pass)
        if ranks.distributed:
            from ood_core.distributed import merge_across_ranks

            merge_across_ranks(detector)
        try:
            finished = detector.finish_pass()
        except (ValueError, RuntimeError, InvalidStateError) as exc:
            raise BadRequestError(f"fitting {type(detector).__name__} failed: {exc}") from exc
        consumed[:] = False
        if finished:
            return detector, resumed
