"""Response and request models of the fit-job and version routes (``/openapi.json`` is generated from them).

:class:`~service.jobs.records.Job` (one job) is the jobs package's own model, answered as it is.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.jobs.records import Job

JOB_ID_SCHEMA = {"pattern": "^[0-9a-f]{16}$"}


class JobList(BaseModel):
    jobs: list[Job] = Field(description="newest first")


class DetectorVersion(BaseModel):
    """A kept version of a detector state."""

    version: int
    sha256: str
    size_bytes: int
    detector_class: str
    created_at: str = Field(description="UTC, ISO 8601")
    source: Literal["upload", "fit", "rollback"] = Field(description="how it was made")
    job_id: str | None = Field(default=None, description="the fit job that made it (source fit)")
    rollback_of: int | None = Field(default=None, description="the version it restores (source rollback)")
    active: bool


class VersionList(BaseModel):
    model: str
    detector: str
    keep: int = Field(description="versions kept (OOD_STATE_KEEP)")
    versions: list[DetectorVersion] = Field(description="newest first; the active one is the highest")


class RollbackBody(BaseModel):
    """Body of ``POST .../rollback``."""

    version: int = Field(ge=1, description="a kept version (see .../versions) to make active again")
