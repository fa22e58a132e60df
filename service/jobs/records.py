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
    hparams: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")
    calibration_share: float = Field(default=0.1, gt=0, lt=1, description="share of each class's ID images held out")
    tpr: float = Field(default=0.95, gt=0, lt=1, description="target ID true-positive rate of the threshold")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="seeds the calibration hold-out")
    skip_invalid: bool = Field(default=False, description="skip (and count) undecodable images instead of failing")
    batch_size: int = Field(default=64, ge=1, le=4096, description="images per forward of the fit")


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
