""":class:`OODClient`: the synchronous client (``httpx.Client``); every operation is built by
:mod:`service.client.core`, sent with its retry rule and read into the service's own response models."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from httpx_sse import connect_sse

from service.api.job_schemas import VersionList
from service.api.schemas import DetectorInfo, DriftResponse, ModelInfo, ScoreResponse, SegmentResponse
from service.client import core
from service.client.core import Call, FitOptions, Retry
from service.client.images import Images
from service.client.progress import JobFollower
from service.jobs.records import Job, JobState

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
STREAM_READ_TIMEOUT_S = 60.0
"""A job's event stream sends a keep-alive every 15 s: a stream quiet for this long is reopened."""
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
STREAM_CUTS = (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError)


def client_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` with ``api_key`` (default: ``$OOD_API_KEY``), and the client's user agent."""
    key = api_key if api_key is not None else os.environ.get("OOD_API_KEY")
    headers = {"User-Agent": "ood-serve-client"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


class OODClient:
    """Synchronous client of an ood-serve service.

    ``OODClient("http://host:8000", api_key=...)``; a context manager (or call :meth:`close`). Errors are
    :class:`~service.client.errors.ProblemError` with the service's problem body; 429 / 503 answers are retried
    per ``retry`` (:class:`~service.client.core.Retry`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.retry = retry or Retry()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url, headers=client_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> OODClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, call: Call[Any]) -> httpx.Response:
        kwargs = call.request_kwargs()
        if call.upload is None:
            return self._http.request(call.method, call.path, **kwargs)
        with call.upload.open("rb") as body:  # streamed; httpx sends its Content-Length
            return self._http.request(call.method, call.path, content=body, **kwargs)

    def send(self, call: Call[T]) -> T:
        """Send ``call`` (retrying 429 / 503 and refused connections) and read its answer."""
        attempts = core.Attempts(self.retry)
        while True:
            try:
                response = self._request(call)
            except CONNECT_ERRORS as error:
                self._sleep(attempts.after_refused(error))
                continue
            if response.is_success:
                return call.read(response)
            self._sleep(attempts.after_answer(response))

    # --- models and detector states ---------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return self.send(core.list_models())

    def model(self, model: str) -> ModelInfo:
        return self.send(core.get_model(model))

    def detectors(self, model: str) -> list[DetectorInfo]:
        """The model's active detector states."""
        return self.send(core.list_detectors(model))

    def upload_state(self, model: str, name: str, state: bytes | str | Path) -> DetectorInfo:
        """Install a ``save_detector`` state (bytes or a file path, streamed) as ``name``; validated by the service."""
        return self.send(core.upload_state(model, name, state))

    def download_state(self, model: str, name: str, path: str | Path | None = None) -> bytes:
        """The active state file, byte-identical; also written to ``path`` when given."""
        data = self.send(core.download_state(model, name))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def delete_state(self, model: str, name: str) -> None:
        self.send(core.delete_state(model, name))

    def versions(self, model: str, name: str) -> VersionList:
        return self.send(core.versions(model, name))

    def rollback(self, model: str, name: str, version: int) -> DetectorInfo:
        return self.send(core.rollback(model, name, version))

    # --- scoring ------------------------------------------------------------------------------------------------

    def score(self, model: str, images: Images, **options: Unpack[core.ScoreOptions]) -> ScoreResponse:
        """Per image (paths, bytes, PIL images or arrays), the prediction and every selected detector's verdict
        (``options``: :class:`~service.client.core.ScoreOptions`)."""
        return self.send(core.score(model, images, options))

    def segment(self, model: str, images: Images, **options: Unpack[core.SegmentOptions]) -> SegmentResponse:
        """Per image and detector an anomaly map (``service.client.decode_map`` makes it an array; ``options``:
        :class:`~service.client.core.SegmentOptions`)."""
        return self.send(core.segment(model, images, options))

    def drift(self, model: str) -> DriftResponse:
        return self.send(core.drift(model))

    # --- fit jobs -----------------------------------------------------------------------------------------------

    def start_fit(
        self,
        model: str,
        name: str,
        archive: str | Path | None = None,
        *,
        detector_class: str,
        **options: Unpack[FitOptions],
    ) -> Job:
        """Queue a fit job (202); see :func:`service.client.core.start_fit` for the data and
        :class:`~service.client.core.FitOptions` for ``options``."""
        return self.send(core.start_fit(model, name, archive, detector_class, options))

    def fit(
        self,
        model: str,
        name: str,
        archive: str | Path | None = None,
        *,
        detector_class: str,
        progress: bool = True,
        on_progress: Callable[[Job], None] | None = None,
        **options: Unpack[FitOptions],
    ) -> Job:
        """Start a fit job (``options``: those of :meth:`start_fit`) and follow it to its end with a progress bar;
        the final job (``state`` done, failed or cancelled; ``result`` when done)."""
        job = self.start_fit(model, name, archive, detector_class=detector_class, **options)
        return self.follow(job.id, progress=progress, on_progress=on_progress)

    def follow(self, job_id: str, *, progress: bool = True, on_progress: Callable[[Job], None] | None = None) -> Job:
        """Read a job's event stream until its final event (reopened after a cut, resuming after the last event)."""
        follower = JobFollower(job_id, progress=progress, on_progress=on_progress)
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        try:
            while True:
                try:
                    job = self._stream(job_id, follower, timeout)
                except STREAM_CUTS:
                    job = None
                if job is None:  # the stream closed before the final event: has the job ended?
                    follower.stream_ended()
                    job = follower.settle(self.job(job_id))
                if job is not None:
                    return job
        finally:
            follower.close()

    def _stream(self, job_id: str, follower: JobFollower, timeout: httpx.Timeout) -> Job | None:
        attempts = core.Attempts(self.retry)
        path = core.job_events_path(job_id)
        while True:
            with connect_sse(self._http, "GET", path, headers=follower.headers(), timeout=timeout) as source:
                response = source.response
                if response.is_success:
                    for event in source.iter_sse():
                        job = follower.feed(event)
                        if job is not None:
                            return job
                    return None
                response.read()
                wait = attempts.after_answer(response)
            self._sleep(wait)

    def jobs(self, model: str | None = None, state: JobState | None = None) -> list[Job]:
        """Fit jobs, newest first (optionally of one model / in one state)."""
        return self.send(core.list_jobs(model, state))

    def job(self, job_id: str) -> Job:
        return self.send(core.get_job(job_id))

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job (its partial work is discarded; the active state stays)."""
        return self.send(core.cancel_job(job_id))
