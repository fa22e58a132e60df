"""Schedules, runs, cancels and recovers the server's fit jobs.

One job runs per model at a time, in a worker thread of its own; the others wait in that model's queue (at most
``OOD_MAX_QUEUED_FIT_JOBS``; admission is reserved before a body is read, so a refused job costs no upload). A job
runs :func:`service.fit.runner.run_fit` with :class:`~service.jobs.forward.ScoringFirstForward` (its forwards go
between the model's scoring batches) and a ``should_stop`` that a cancel turns true; a finished job's state is
installed like an upload (:meth:`service.states.manager.StateManager.install`: validated, stored as the next
version with the job's id as its source, swapped in with zero downtime; replicas follow through the state
directory). A cancelled or failed job installs nothing: the active state stays. The job's spool (its uploaded data)
is removed when it ends (the worker thread's side: :mod:`service.jobs.running`). Records
(:mod:`service.jobs.journal`) are written at every change of state and at most every
:data:`~service.jobs.running.SAVE_EVERY_S` seconds of progress; the last ``OOD_KEEP_JOBS`` finished ones are kept.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.engine.catalog import ModelCatalog
from service.jobs.errors import JobFinishedError, JobNotFoundError, JobQueueFullError, JobsClosedError
from service.jobs.events import JobEvents
from service.jobs.journal import JOBS_FOLDER, JobJournal
from service.jobs.records import INTERRUPTED, Job, JobRecord, JobState
from service.jobs.running import JobObserver, JobRunner, LiveJob
from service.settings import Settings
from service.states.manager import StateManager

logger = logging.getLogger("service.jobs")


class JobManager(JobRunner):
    """The fit jobs of one service process."""

    def __init__(
        self, settings: Settings, catalog: ModelCatalog, states: StateManager, observer: JobObserver | None = None
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.states = states
        self.observer = observer
        self.journal = JobJournal(settings.state_dir / JOBS_FOLDER)
        self._lock = threading.Lock()
        self._live: dict[str, LiveJob] = {}
        self._finished: dict[str, tuple[JobRecord, JobEvents]] = {}
        """Jobs this process ran, kept for their event streams (the last ``keep_jobs``)."""
        self._queues: dict[str, deque[str]] = {}
        self._running: dict[str, str] = {}
        self._reserved: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.redact: Callable[[str], str] = lambda message: message
        """Applied to every error a job records (the app sets the problem bodies' redactor: no server paths)."""

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> list[JobRecord]:
        """At start-up (blocking): interrupted jobs failed, their spools removed, old records pruned."""
        interrupted = self.journal.recover()
        self.journal.prune(self.settings.keep_jobs)
        return interrupted

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs; fail the queued and running ones ("interrupted by a restart") and wait for them."""
        with self._lock:
            self._closing = True
            lives = list(self._live.values())
        for live in lives:
            live.interrupted = True
            live.cancel.set()
        for model in list(self._queues):
            while (job_id := self._pop_queued(model)) is not None:
                queued = self._live.get(job_id)
                if queued is not None:
                    self._finish(queued, "failed", error=INTERRUPTED)
        for live in lives:
            if live.thread is not None:
                await asyncio.to_thread(live.thread.join, timeout_s)

    # ------------------------------------------------------------------ admission
    @contextmanager
    def reserve(self, model: str) -> Iterator[None]:
        """Hold a place in ``model``'s queue while a job's data is read; 429 when the queue is full."""
        with self._lock:
            if self._closing:
                raise JobsClosedError()
            waiting = len(self._queues.get(model, ())) + self._reserved.get(model, 0)
            busy = model in self._running or waiting > 0
            if busy and waiting >= self.settings.max_queued_fit_jobs:
                raise JobQueueFullError(
                    f"model {model!r} has a running fit job and {waiting} waiting (OOD_MAX_QUEUED_FIT_JOBS="
                    f"{self.settings.max_queued_fit_jobs}); retry later",
                    retry_after_s=self._retry_after(model),
                )
            self._reserved[model] = self._reserved.get(model, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved[model] -= 1

    def _retry_after(self, model: str) -> float:
        running = self._live.get(self._running.get(model, ""))
        eta = running.record.eta_s if running is not None else None
        return max(5.0, min(3600.0, eta or 30.0))

    def claim(self, job_id: str) -> int:
        """Own a new job id before its data is spooled (a restart can then tell its spool from a dead one)."""
        return self.journal.claim(job_id)

    def submit(self, record: JobRecord, lock_fd: int) -> Job:
        """Queue a job whose data is in place (inside :meth:`reserve`, after :meth:`claim`); start it if the
        model is free."""
        live = LiveJob(record=record, events=JobEvents(self._loop), lock_fd=lock_fd)
        if self._closing:
            raise JobsClosedError()
        self.journal.save(record)
        self._publish(live)
        with self._lock:
            self._live[record.id] = live
            self._queues.setdefault(record.model, deque()).append(record.id)
            closing = self._closing
        if closing:  # stop() began meanwhile and did not see this job
            self._finish(live, "failed", error=INTERRUPTED)
            return record.public()
        logger.info("fit job queued", extra={"job": record.id, "model": record.model, "detector": record.detector})
        self._schedule(record.model)
        return record.public()

    def abandon(self, job_id: str, lock_fd: int) -> None:
        """Undo :meth:`claim` for a job that was never queued: its spool and lock go."""
        self.journal.remove_spool(job_id)
        self.journal.release(job_id, lock_fd)

    # ------------------------------------------------------------------ reading
    def get(self, job_id: str) -> Job:
        return self._record(job_id).public()

    def _record(self, job_id: str) -> JobRecord:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                return live.record.model_copy(deep=True)
            if job_id in self._finished:
                return self._finished[job_id][0]
        record = self.journal.load(job_id)
        if record is None:
            raise JobNotFoundError(f"no fit job {job_id!r}")
        return record

    def list(self, model: str | None = None, state: JobState | None = None) -> list[Job]:
        """Every job on record (this replica's and the others'), newest first."""
        records = {r.id: r for r in self.journal.load_all()}
        with self._lock:
            records.update({i: live.record.model_copy(deep=True) for i, live in self._live.items()})
        chosen = [
            r for r in records.values() if (model is None or r.model == model) and (state is None or r.state == state)
        ]
        return [r.public() for r in sorted(chosen, key=lambda r: (r.created_at, r.id), reverse=True)]

    def events(self, job_id: str) -> JobEvents:
        """The job's event stream; a job of another replica or an old one gives its record as the only event."""
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                return live.events
            if job_id in self._finished:
                return self._finished[job_id][1]
        record = self._record(job_id)
        events = JobEvents(self._loop)
        events.publish("job" if record.finished else "progress", record.public().model_dump_json(), last=True)
        return events

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; whether it is this process's (then it ends promptly). A job of another
        replica gets a cancel request it sees between batches. 409 for a finished job."""
        with self._lock:
            live = self._live.get(job_id)
            queued = live is not None and live.record.state == "queued"
            if queued and live is not None:
                self._queues[live.record.model].remove(job_id)
        if live is None:
            record = self._record(job_id)
            if record.finished:
                raise JobFinishedError(f"fit job {job_id} already ended ({record.state})")
            self.journal.request_cancel(job_id)
            return False
        live.cancel.set()
        if queued:
            self._finish(live, "cancelled")
        return True

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for a job of this process to end."""
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            await asyncio.to_thread(live.done.wait, timeout_s)

    # ------------------------------------------------------------------ running
    def _pop_queued(self, model: str) -> str | None:
        with self._lock:
            queue = self._queues.get(model)
            return queue.popleft() if queue else None

    def _schedule(self, model: str) -> None:
        """Start the model's next queued job if none is running."""
        with self._lock:
            if self._closing or model in self._running or not self._queues.get(model):
                return
            job_id = self._queues[model].popleft()
            live = self._live[job_id]
            self._running[model] = job_id
            live.thread = threading.Thread(target=self._run, args=(live,), name=f"fit-job-{job_id}", daemon=True)
        live.thread.start()

    def active_counts(self) -> dict[tuple[str, str], int]:
        """(model, state) -> number of this process's queued and running jobs (for the gauge)."""
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for live in self._live.values():
                key = (live.record.model, live.record.state)
                counts[key] = counts.get(key, 0) + 1
        return counts
