"""What ``ood-fit`` shows: a tqdm progress bar (images/s, ETA), the summary at the end and the ``--json`` report."""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from service.fit.stream import FitProgress

if TYPE_CHECKING:
    from service.fit.runner import FitResult

METRIC_KEYS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR")


class ProgressBar:
    """A tqdm bar on stderr fed with :class:`FitProgress` (one bar for the whole fit, its phase as description)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm[Any] | None = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, progress: FitProgress) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=progress.images_total, unit="img", file=sys.stderr, dynamic_ncols=True)
        bar = self.bar
        if progress.images_total is not None and bar.total is None:  # the scan is done: the real bar starts
            bar.reset(total=progress.images_total)
            bar.initial = bar.n = bar.last_print_n = progress.images_done  # a resumed fit starts past 0
        bar.set_description(progress.phase, refresh=False)
        if progress.images_skipped:
            bar.set_postfix(skipped=progress.images_skipped, refresh=False)
        bar.update(progress.images_done - bar.n)


def report_json(result: FitResult, detector: str, model: str) -> dict[str, Any]:
    """``images``, ``skipped``, ``calibration_size``, ``threshold``, ``metrics`` (``null`` without OOD data), and
    ``detector``, ``model``, ``target_tpr``, ``fit_images``, ``ood_images``, ``warnings``, ``hparams`` (the written
    detector's constructor arguments: a grid's best) and ``search`` (``null``, or with a grid in ``--hparams`` the
    report of :class:`service.fit.grid.FitGridSearch`: ``metric``, ``best`` and a row per candidate with its
    ``params``, ``hparams``, ``score``, ``metrics`` or ``error``)."""
    return {
        "images": result.images,
        "skipped": result.skipped,
        "calibration_size": result.calibration_size,
        "threshold": result.threshold,
        "metrics": result.metrics,
        "detector": detector,
        "model": model,
        "target_tpr": result.target_tpr,
        "fit_images": result.fit_images,
        "ood_images": result.ood_images,
        "warnings": result.warnings,
        "hparams": result.hparams,
        "search": result.search,
    }


def summary(result: FitResult, detector: str, model: str, out: Path) -> str:
    lines = [
        f"{detector} on {model}: state written to {out} ({len(result.state)} bytes)",
        f"  images      {result.images} used ({result.fit_images} fit, {result.calibration_size} calibration, "
        f"{result.ood_images} OOD), {result.skipped} skipped",
        f"  threshold   {result.threshold:.6g} at {result.target_tpr:.0%} ID TPR",
    ]
    if result.resumed_images:
        lines.append(f"  resumed     {result.resumed_images} images came from the checkpoint")
    if result.metrics is not None:
        shown = "  ".join(f"{k} {result.metrics[k]:.4f}" for k in METRIC_KEYS if k in result.metrics)
        lines.append(f"  metrics     {shown} (held-out ID vs ood/)")
    if result.search is not None:
        lines.extend(grid_lines(result.search))
    lines.extend(f"  warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def grid_lines(search: dict[str, Any]) -> list[str]:
    """One line per candidate of a grid search: its values, its metric or its error; the best marked."""
    best = search["best"]["params"] if search["best"] is not None else None
    lines = [f"  grid        {len(search['results'])} candidates ranked by {search['metric']} (held-out ID vs ood/)"]
    for row in search["results"]:
        values = " ".join(f"{k}={v}" for k, v in row["params"].items())
        if row["error"] is not None:
            lines.append(f"    {values}: error: {row['error']}")
        else:
            mark = "  <- best, written" if row["params"] == best else ""
            lines.append(f"    {values}: {search['metric']} {row['score']:.4f}{mark}")
    return lines
