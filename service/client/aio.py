""":class:`AsyncOODClient`: the asyncio client (``httpx.AsyncClient``), the same operations as
:class:`~service.client.sync.OODClient` built by the same :mod:`service.client.core`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from httpx_sse import aconnect_sse

from service.api.job_schemas import VersionList
from service.api.schemas import DetectorInfo, DriftResponse, ModelInfo, ScoreResponse, SegmentResponse
from service.client import core
from service.client.core import Call, FitOptions, Retry
from service.client.images import Images
from service.client.progress import JobFollower
from service.client.sync import CONNECT_ERRORS, DEFAULT_URL, STREAM_CUTS, STREAM_READ_TIMEOUT_S, client_headers
from service.jobs.records import Job, JobState

T = TypeVar("T")


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as body:
        while chunk := await asyncio.to_thread(body.read, core.UPLOAD_CHUNK):
            yield chunk


class AsyncOODClient:
    """Asyncio client of an ood-serve service.

    ``AsyncOODClient("http://host:8000", api_key=...)``; an async context manager (or :meth:`aclose`). Errors are
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
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.retry = retry or Retry()
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=client_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncOODClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, call: Call[Any]) -> httpx.Response:
        kwargs = call.request_kwargs()
        upload = call.upload
        if upload is None:
            return await self._http.request(call.method, call.path, **kwargs)
        size = (await asyncio.to_thread(upload.stat)).st_size
        kwargs["headers"] = {**kwargs.get("headers", {}), "Content-Length": str(size)}  # streamed, not chunked
        return await self._http.request(call.method, call.path, content=_chunks(upload), **kwargs)

    async def send(self, call: Call[T]) -> T:
        """Send ``call`` (retrying 429 / 503 and refused connections) and read its answer."""
        attempts = core.Attempts(self.retry)
        while True:
            try:
                response = await self._request(call)
            except CONNECT_ERRORS as error:
                await self._sleep(attempts.after_refused(error))
                continue
            if response.is_success:
                return call.read(response)
            await self._sleep(attempts.after_answer(response))

    # --- models and detector states ---------------------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        return await self.send(core.list_models())

    async def model(self, model: str) -> ModelInfo:
        return await self.send(core.get_model(model))

    async def detectors(self, model: str) -> list[DetectorInfo]:
        """The model's active detector states."""
        return await self.send(core.list_detectors(model))

    async def upload_state(self, model: str, name: str, state: bytes | str | Path) -> DetectorInfo:
        """Install a ``save_detector`` state (bytes or a file path, streamed) as ``name``; validated by the service."""
        return await self.send(core.upload_state(model, name, state))

    async def download_state(self, model: str, name: str, path: str | Path | None = None) -> bytes:
        """The active state file, byte-identical; also written to ``path`` when given."""
        data = await self.send(core.download_state(model, name))
        if path is not None:
            await asyncio.to_thread(Path(path).write_bytes, data)
        return data

    async def delete_state(self, model: str, name: str) -> None:
        await self.send(core.delete_state(model, name))

    async def versions(self, model: str, name: str) -> VersionList:
        return await self.send(core.versions(model, name))

    async def rollback(self, model: str, name: str, version: int) -> DetectorInfo:
        return await self.send(core.rollback(model, name, version))

    # --- scoring ------------------------------------------------------------------------------------------------

    async def score(self, model: str, images: Images, **options: Unpack[core.ScoreOptions]) -> ScoreResponse:
        """Per image (paths, bytes, PIL images or arrays), the prediction and every selected detector's verdict
        (``options``: :class:`~service.client.core.ScoreOptions`)."""
        call = await asyncio.to_thread(core.score, model, images, options)  # file reads, PNG encoding
        return await self.send(call)

    async def segment(self, model: str, images: Images, **options: Unpack[core.SegmentOptions]) -> SegmentResponse:
        """Per image and detector an anomaly map (``service.client.decode_map`` makes it an array; ``options``:
        :class:`~service.client.core.SegmentOptions`)."""
        call = await asyncio.to_thread(core.segment, model, images, options)
        return await self.send(call)

    async def drift(self, model: str) -> DriftResponse:
        return await self.send(core.drift(model))

    # --- fit jobs -----------------------------------------------------------------------------------------------

    async def start_fit(
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
        call = await asyncio.to_thread(core.start_fit, model, name, archive, detector_class, options)
        return await self.send(call)

    async def fit(
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
        job = await self.start_fit(model, name, archive, detector_class=detector_class, **options)
        return await self.follow(job.id, progress=progress, on_progress=on_progress)

    async def follow(
        self, job_id: str, *, progress: bool = True, on_progress: Callable[[Job], None] | None = None
    ) -> Job:
        """Read a job's event stream until its final event (reopened after a cut, resuming after the last event)."""
        follower = JobFollower(job_id, progress=progress, on_progress=on_progress)
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        try:
            while True:
                try:
                    job = await self._stream(job_id, follower, timeout)
                except STREAM_CUTS:
                    job = None
                if job is None:  # the stream closed before the final event: has the job ended?
                    follower.stream_ended()
                    job = follower.settle(await self.job(job_id))
                if job is not None:
                    return job
        finally:
            follower.close()

    async def _stream(self, job_id: str, follower: JobFollower, timeout: httpx.Timeout) -> Job | None:
        attempts = core.Attempts(self.retry)
        path = core.job_events_path(job_id)
        while True:
            async with aconnect_sse(self._http, "GET", path, headers=follower.headers(), timeout=timeout) as source:
                response = source.response
                if response.is_success:
                    async for event in source.aiter_sse():
                        job = follower.feed(event)
                        if job is not None:
                            return job
                    return None
                await response.aread()
                wait = attempts.after_answer(response)
            await self._sleep(wait)

    async def jobs(self, model: str | None = None, state: JobState | None = None) -> list[Job]:
        """Fit jobs, newest first (optionally of one model / in one state)."""
        return await self.send(core.list_jobs(model, state))

    async def job(self, job_id: str) -> Job:
        return await self.send(core.get_job(job_id))

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job (its partial work is discarded; the active state stays)."""
        return await self.send(core.cancel_job(job_id))
