"""Following a fit job: its ``/events`` stream (Server-Sent Events: ``progress`` events, each the job as JSON, then
one ``job`` event, the final job) read into a tqdm progress bar over the job's images.

:class:`JobFollower` is the part the sync and async clients share: it takes each event, keeps the last event id
(sent back as ``Last-Event-ID`` when the stream is reopened after a cut), says when the job has ended and, after a
stream closed early, whether to reopen it (:meth:`JobFollower.settle`).
"""

from __future__ import annotations

from collections.abc import Callable

from httpx_sse import ServerSentEvent
from tqdm.auto import tqdm

from service.client.errors import OODClientError
from service.jobs.records import Job

MAX_QUIET_RECONNECTS = 5
"""Reopened streams in a row that brought no event before the client gives up (the job is then read once)."""


class JobFollower:
    """Feeds a job's events to a progress bar (``progress=True``) and to ``on_progress``; ``job`` is the last seen."""

    def __init__(self, job_id: str, *, progress: bool, on_progress: Callable[[Job], None] | None) -> None:
        self.job_id = job_id
        self.job: Job | None = None
        self.last_event_id: str | None = None
        self.quiet_reconnects = 0
        self.on_progress = on_progress
        self._bar: tqdm | None = None
        self._progress = progress

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def feed(self, event: ServerSentEvent) -> Job | None:
        """Take one event; the final job when it was the last one."""
        if event.event not in ("progress", "job") or not event.data:
            return None
        self.quiet_reconnects = 0
        if event.id:
            self.last_event_id = event.id
        job = Job.model_validate_json(event.data)
        self.update(job)
        if event.event == "job" or job.finished:
            self.close()
            return job
        return None

    def update(self, job: Job) -> None:
        self.job = job
        if self.on_progress is not None:
            self.on_progress(job)
        if not self._progress:
            return
        if self._bar is None:
            self._bar = tqdm(total=job.images_total, unit="img", desc=f"fit {job.model}/{job.detector}", leave=True)
        bar = self._bar
        if job.images_total is not None and bar.total != job.images_total:
            bar.total = job.images_total
        bar.n = job.images_done
        bar.set_postfix_str(f"{job.state}{f' {job.phase}' if job.phase and not job.finished else ''}", refresh=False)
        bar.refresh()

    def stream_ended(self) -> None:
        """The stream closed before the final event (a cut, a restarted server)."""
        self.quiet_reconnects += 1

    @property
    def give_up(self) -> bool:
        return self.quiet_reconnects >= MAX_QUIET_RECONNECTS

    def settle(self, current: Job) -> Job | None:
        """After a stream that closed before the final event, ``current`` (the job read then) if it has ended;
        ``None``: reopen the stream. Raises :class:`OODClientError` when the streams keep closing on a job that has
        not ended."""
        if not (current.finished or self.give_up):
            return None
        self.update(current)
        if not current.finished:
            raise OODClientError(f"the event stream of job {self.job_id} keeps closing; it is {current.state}")
        return current

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
