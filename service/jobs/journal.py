"""Fit jobs on disk: ``<state_dir>/.jobs/`` holds one ``<id>.json`` record per job (written atomically: temporary
file, fsync, rename), the data uploaded with a job under ``spool/<id>/`` and, while a process owns a job (queued or
running), its ``<id>.lock`` with an exclusive ``flock``.

Several replicas may share the state directory: a job whose lock no live process holds (the ``flock`` can be taken
without waiting) was left by a process that died; :meth:`JobJournal.recover` marks it failed, "interrupted by a
restart", and removes its spool. A cancel that reaches a replica other than the job's owner leaves
``<id>.cancel``, which the owner checks between batches.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from contextlib import suppress
from pathlib import Path

from pydantic import ValidationError

from ood_core.state import write_atomic
from service.jobs.records import FINISHED, INTERRUPTED, JobRecord, utc_now
from service.states.cleanup import same_file

logger = logging.getLogger("service.jobs")
JOBS_FOLDER = ".jobs"
SPOOL = "spool"


def new_job_id() -> str:
    """16 random hex digits (also the spool folder's and the lock file's name)."""
    return secrets.token_hex(8)


def _is_job_id(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


class JobJournal:
    """The job records, spools and owner locks under ``folder`` (``<state_dir>/.jobs``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.spool_root = self.folder / SPOOL

    # ------------------------------------------------------------------ records
    def save(self, record: JobRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / f"{record.id}.json", record.model_dump_json(indent=1).encode())

    def load(self, job_id: str) -> JobRecord | None:
        if not _is_job_id(job_id):
            return None
        try:
            return JobRecord.model_validate_json((self.folder / f"{job_id}.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError):
            logger.warning("unreadable job record", extra={"job": job_id}, exc_info=True)
            return None

    def load_all(self) -> list[JobRecord]:
        """Every readable record, oldest first."""
        if not self.folder.is_dir():
            return []
        records = [self.load(p.stem) for p in self.folder.glob("*.json")]
        return sorted((r for r in records if r is not None), key=lambda r: (r.created_at, r.id))

    def prune(self, keep: int) -> list[str]:
        """Remove the records of finished jobs beyond the newest ``keep``; their ids."""
        finished = [r for r in self.load_all() if r.state in FINISHED]
        removed = [r.id for r in finished[: max(0, len(finished) - keep)]]
        for job_id in removed:
            (self.folder / f"{job_id}.json").unlink(missing_ok=True)
            (self.folder / f"{job_id}.cancel").unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ spools
    def spool_dir(self, job_id: str) -> Path:
        """``spool/<id>/`` (created): where the job's uploaded data goes."""
        folder = self.spool_root / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def remove_spool(self, job_id: str) -> None:
        shutil.rmtree(self.spool_root / job_id, ignore_errors=True)

    # ------------------------------------------------------------------ ownership
    def claim(self, job_id: str) -> int:
        """Own the job: its lock file, created and ``flock``-ed; the descriptor holds the lock until :meth:`release`.
        A recovery that removed the file between its creation and the lock makes us create it again."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{job_id}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if same_file(fd, path):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self, job_id: str, fd: int) -> None:
        """Remove the lock file (still holding it), then unlock."""
        try:
            (self.folder / f"{job_id}.lock").unlink(missing_ok=True)
            (self.folder / f"{job_id}.cancel").unlink(missing_ok=True)
        finally:
            os.close(fd)

    def owned_elsewhere(self, job_id: str, remove_dead: bool = False) -> bool:
        """Whether a live process (another replica, or this one through another descriptor) holds the job's lock;
        ``remove_dead``: remove a lock file nobody holds (while holding it)."""
        path = self.folder / f"{job_id}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if remove_dead and same_file(fd, path):
                path.unlink()
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def request_cancel(self, job_id: str) -> None:
        (self.folder / f"{job_id}.cancel").touch()

    def cancel_requested(self, job_id: str) -> bool:
        return (self.folder / f"{job_id}.cancel").exists()

    # ------------------------------------------------------------------ restart
    def recover(self) -> list[JobRecord]:
        """At start-up: jobs left queued or running by a dead process become failed ("interrupted by a restart"),
        their spools and lock files removed; spools and locks of no job are removed too. The interrupted ones."""
        interrupted = []
        live: set[str] = set()
        for record in self.load_all():
            if record.state in FINISHED:
                continue
            if self.owned_elsewhere(record.id, remove_dead=True):
                live.add(record.id)
                continue
            record.state, record.error, record.finished_at = "failed", INTERRUPTED, utc_now()
            record.phase, record.eta_s, record.images_per_s = None, None, 0.0
            self.save(record)
            interrupted.append(record)
        if self.spool_root.is_dir():
            for entry in self.spool_root.iterdir():
                if entry.name not in live and not self.owned_elsewhere(entry.name):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for lock in self.folder.glob("*.lock") if self.folder.is_dir() else ():
            if lock.stem not in live:
                with suppress(OSError):
                    self.owned_elsewhere(lock.stem, remove_dead=True)
        if interrupted:
            logger.warning("fit jobs interrupted by a restart", extra={"jobs": [r.id for r in interrupted]})
        return interrupted
