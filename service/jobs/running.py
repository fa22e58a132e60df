"""What a fit job's worker thread does: fit through :func:`service.fit.runner.run_fit`, report progress, install
the result, end the job (:class:`JobRunner`, the base of :class:`service.jobs.manager.JobManager`).

A job runs at the lowest thread priority (:func:`lower_thread_priority`) with
:class:`~service.jobs.forward.ScoringFirstForward` as its forward; ``should_stop`` turns true on a cancel (here, or a
``<id>.cancel`` request left by another replica). A job that ends, however it ends, has its spool removed, its record
written, its lock released and its event stream closed with the final job, then the model's next job starts.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

from ood_core.api import InvalidStateError
from service.engine.catalog import ModelCatalog
from service.errors import ServiceError
from service.fit.runner import FitCancelled, FitOptions, FitProgress, FitResult, run_fit
from service.jobs.data import open_job_source, public_message
from service.jobs.events import JobEvents
from service.jobs.forward import ScoringFirstForward
from service.jobs.journal import JobJournal
from service.jobs.records import INTERRUPTED, GridSearchReport, JobRecord, JobResult, JobState, utc_now
from service.settings import Settings
from service.states.manager import StateManager
from service.states.versions import VersionOrigin

logger = logging.getLogger("service.jobs")
SAVE_EVERY_S = 1.0


JOB_NICE = 19
"""Nice value of a job's worker thread (Linux: per thread): the kernel runs the scoring threads first."""


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority, where the OS allows it per thread (Linux); else nothing."""
    if not sys.platform.startswith("linux"):
        return
    with suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), JOB_NICE)


class JobObserver(Protocol):
    """Receives the jobs' metrics (:class:`service.metrics.ServiceMetrics`)."""

    def on_fit_images(self, model: str, count: int) -> None: ...

    def on_job_finished(self, model: str, state: str, seconds: float) -> None: ...


@dataclass(eq=False)
class LiveJob:
    """A job this process owns (queued or running)."""

    record: JobRecord
    events: JobEvents
    lock_fd: int
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = 0.0
    saved_at: float = 0.0
    images_seen: int = 0


class JobRunner:
    """The job thread's side of :class:`~service.jobs.manager.JobManager` (which sets these attributes)."""

    settings: Settings
    catalog: ModelCatalog
    states: StateManager
    observer: JobObserver | None
    journal: JobJournal
    redact: Callable[[str], str]
    _lock: threading.Lock
    _live: dict[str, LiveJob]
    _finished: dict[str, tuple[JobRecord, JobEvents]]
    _running: dict[str, str]

    def _schedule(self, model: str) -> None:
        raise NotImplementedError

    def _should_stop(self, live: LiveJob) -> bool:
        if not live.cancel.is_set() and self.journal.cancel_requested(live.record.id):
            live.cancel.set()
        return live.cancel.is_set()

    def _run(self, live: LiveJob) -> None:
        record = live.record
        live.started = time.monotonic()
        lower_thread_priority()
        with self._lock:
            record.state, record.started_at, record.phase = "running", utc_now(), "start"
        self._save(live, force=True)
        self._publish(live)
        logger.info("fit job started", extra={"job": record.id, "model": record.model})
        try:
            if self._should_stop(live):
                raise FitCancelled()
            result = self._fit(live)
            if self._should_stop(live):
                raise FitCancelled()
            model = self.catalog.get(record.model)
            origin = VersionOrigin("fit", job_id=record.id)
            active = self.states.install(model, record.detector, result.state, origin)
            job_result = JobResult(
                version=active.stored.version,
                sha256=active.stored.sha256,
                threshold=result.threshold,
                target_tpr=result.target_tpr,
                calibration_size=result.calibration_size,
                images=result.images,
                skipped=result.skipped,
                metrics=result.metrics,
                warnings=list(result.warnings),
                hparams=result.hparams,
                search=None if result.search is None else GridSearchReport.model_validate(result.search),
            )
            self._finish(live, "done", result=job_result)
        except FitCancelled:
            self._finish(
                live, "failed" if live.interrupted else "cancelled", error=INTERRUPTED if live.interrupted else None
            )
        except (ServiceError, InvalidStateError, ValueError) as exc:
            message = public_message(str(exc) or type(exc).__name__, record, self.settings, self.journal)
            self._finish(live, "failed", error=message)
        except Exception as exc:  # never a silent job: the reason without internals, the traceback in the log
            logger.exception("fit job failed unexpectedly", extra={"job": record.id})
            self._finish(live, "failed", error=f"internal error ({type(exc).__name__}); see the server log")

    def _fit(self, live: LiveJob) -> FitResult:
        record = live.record
        model = self.catalog.get(record.model)
        source = open_job_source(record, model, self.settings, self.journal)
        options = FitOptions.from_parameters(record.parameters)
        forward = ScoringFirstForward(model, lambda: self._should_stop(live))
        return run_fit(
            model,
            source,
            options,
            progress=lambda p: self._progress(live, p),
            should_stop=lambda: self._should_stop(live),
            forward=forward,
        )

    def _progress(self, live: LiveJob, progress: FitProgress) -> None:
        record = live.record
        with self._lock:
            record.phase = progress.phase
            record.images_done = progress.images_done
            record.images_total = progress.images_total
            record.images_skipped = progress.images_skipped
            record.images_per_s = round(float(progress.images_per_s), 3)
            record.eta_s = None if progress.eta_s is None else round(float(progress.eta_s), 3)
            fitted, live.images_seen = max(0, progress.images_done - live.images_seen), progress.images_done
        if fitted and self.observer is not None:
            self.observer.on_fit_images(record.model, fitted)
        self._save(live)
        self._publish(live)

    def _finish(
        self, live: LiveJob, state: JobState, error: str | None = None, result: JobResult | None = None
    ) -> None:
        record = live.record
        self.journal.remove_spool(record.id)  # before the job reads as ended: an ended job has no spool
        with self._lock:
            record.state, record.error, record.result = state, None if error is None else self.redact(error), result
            record.finished_at = utc_now()
            record.phase, record.eta_s = None, None
            if state != "done":
                record.images_per_s = 0.0
        self._save(live, force=True)
        self.journal.release(record.id, live.lock_fd)
        with self._lock:
            self._live.pop(record.id, None)
            if self._running.get(record.model) == record.id:
                del self._running[record.model]
            self._finished[record.id] = (record, live.events)
            while len(self._finished) > self.settings.keep_jobs:
                self._finished.pop(next(iter(self._finished)))
        live.events.publish("job", record.public().model_dump_json(), last=True)
        live.done.set()
        if self.observer is not None:
            seconds = time.monotonic() - live.started if live.started else 0.0
            self.observer.on_job_finished(record.model, state, seconds)
        try:
            self.journal.prune(self.settings.keep_jobs)
        except OSError:
            logger.warning("cannot prune old job records", exc_info=True)
        logger.info("fit job ended", extra={"job": record.id, "model": record.model, "state": state, "error": error})
        self._schedule(record.model)

    def _save(self, live: LiveJob, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - live.saved_at < SAVE_EVERY_S:
            return
        live.saved_at = now
        with self._lock:
            snapshot = live.record.model_copy(deep=True)
        try:
            self.journal.save(snapshot)
        except OSError:  # a full volume must not kill the job: the next save tries again
            logger.warning("cannot write the job record", extra={"job": snapshot.id}, exc_info=True)

    def _publish(self, live: LiveJob) -> None:
        with self._lock:
            data = live.record.public().model_dump_json()
        live.events.publish("progress", data)
