"""What a fit job is: its parameters, its progress, its result, and the record kept of it on disk.

:class:`Job` is also the HTTP answer (``/v1/jobs/{id}``); :class:`JobRecord` adds what only the server needs (where
its data is). States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled`` (a queued job may be
cancelled or fail before it runs).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed", "cancelled")
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled"})
DataKind = Literal["archive", "source", "outputs", "images"]
INTERRUPTED = "interrupted by a restart"


def utc_now() -> str:
    """UTC, ISO 8601 with milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class FitParameters(BaseModel):
    """How a job fits (query parameters or JSON / form fields of ``POST .../fit``)."""

    model_config = ConfigDict(extra="forbid")

    detector_class: str = Field(min_length=1, description="an ood_core detector class, e.g. Mahalanobis")
    hparams: dict[str, Any] = Field(
        default_factory=dict,
        description='constructor arguments; with the key "grid" a grid search: {"grid": {"k": [1, 5, 50]}, ...} fits '
        "every combination of the lists (the other keys fixed), keeps the best by AUROC on the data's ood/ images "
        "and reports every candidate in the result's search",
    )
    calibration_share: float = Field(default=0.1, gt=0, lt=1, description="share of each class's ID images held out")
    tpr: float = Field(default=0.95, gt=0, lt=1, description="target ID true-positive rate of the threshold")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="seeds the calibration hold-out")
    skip_invalid: bool = Field(default=False, description="skip (and count) undecodable images instead of failing")
    batch_size: int = Field(default=64, ge=1, le=4096, description="images per forward of the fit")


class GridCandidate(BaseModel):
    """One candidate of a grid search (a row of ``ood_core.search.GridSearch``'s report)."""

    params: dict[str, Any] = Field(description="its values of the grid")
    hparams: dict[str, Any] = Field(description="its constructor arguments (the fixed ones and the grid's)")
    score: float | None = Field(description="the ranking metric (AUROC); null when the candidate failed")
    metrics: dict[str, float | None] = Field(description="AUROC, AUPR-IN, AUPR-OUT, FPR95TPR on held-out ID vs ood/")
    error: str | None = Field(description="why it could not be built, fitted or scored (it is then out of the race)")
    seconds: float = Field(description="its own fit and scoring time (the shared forwards excluded)")


class GridBest(BaseModel):
    params: dict[str, Any]
    hparams: dict[str, Any] = Field(description="the installed detector's constructor arguments")
    score: float


class GridSearchReport(BaseModel):
    """A grid search's candidates, in grid order; the best (the first of the highest score) is installed."""

    detector: str
    metric: str = Field(description="what ranks the candidates: AUROC on held-out ID vs ood/")
    higher_is_better: bool
    best: GridBest | None
    results: list[GridCandidate]


class JobResult(BaseModel):
    """What a finished job installed."""

    version: int = Field(description="the detector state version it installed")
    sha256: str
    threshold: float = Field(description="at the target TPR, from the held-out calibration scores")
    target_tpr: float
    calibration_size: int = Field(description="held-out ID images the threshold and p-values come from")
    images: int = Field(description="images (or output rows) fitted on")
    skipped: int = Field(description="invalid images skipped (skip_invalid)")
    metrics: dict[str, float] | None = Field(
        None, description="AUROC, AUPR-IN, AUPR-OUT, FPR95TPR on the held-out ID and the ood/ images (when given)"
    )
    warnings: list[str] = Field(default_factory=list, description="e.g. a calibration set too small for the TPR")
    hparams: dict[str, Any] = Field(
        default_factory=dict, description="the installed detector's constructor arguments (a grid's best candidate)"
    )
    search: GridSearchReport | None = Field(None, description="with a grid in hparams: every candidate's row")


class Job(BaseModel):
    """A fit job on the server."""

    id: str
    model: str
    detector: str = Field(description="the detector name the result is installed as")
    detector_class: str
    state: JobState
    data: DataKind = Field(description="an uploaded archive, a source under OOD_FIT_DATA_ROOT, outputs or images")
    parameters: FitParameters
    phase: str | None = Field(default=None, description="what a running job is doing (scan, fit, calibrate, ...)")
    images_done: int = 0
    images_total: int | None = None
    images_skipped: int = 0
    images_per_s: float = 0.0
    eta_s: float | None = None
    created_at: str = Field(description="UTC, ISO 8601")
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = Field(default=None, description="why it failed")
    result: JobResult | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class JobRecord(Job):
    """A job as kept in ``<state_dir>/.jobs/<id>.json``."""

    spool: str | None = Field(default=None, description="data uploaded with the job, relative to the jobs folder")
    source: str | None = Field(default=None, description="path relative to OOD_FIT_DATA_ROOT")

    def public(self) -> Job:
        return Job.model_validate(self.model_dump(exclude={"spool", "source"}))
