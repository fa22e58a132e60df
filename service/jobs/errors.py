"""The fit jobs' exceptions (their HTTP statuses are in :mod:`service.api.problems`' table)."""

from __future__ import annotations

from service.errors import ServiceError


class JobNotFoundError(ServiceError):
    """No job of that id (404)."""

    title = "Unknown job"


class JobQueueFullError(ServiceError):
    """The model already has ``OOD_MAX_QUEUED_FIT_JOBS`` jobs waiting (429 with ``Retry-After``)."""

    title = "Too many fit jobs"

    def __init__(self, detail: str, retry_after_s: float = 30.0) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class JobFinishedError(ServiceError):
    """The job already ended: there is nothing to cancel (409)."""

    title = "Job already finished"


class JobsClosedError(ServiceError):
    """The service is shutting down: no new job (503 with ``Retry-After``)."""

    title = "Service shutting down"

    def __init__(self, detail: str = "the service is shutting down: no new fit job") -> None:
        super().__init__(detail, headers={"Retry-After": "5"})
