"""Fit jobs: list, read, cancel and follow (Server-Sent Events) the jobs of ``POST .../fit``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import ReadAccess, WriteAccess
from service.api.job_schemas import JOB_ID_SCHEMA, JobList
from service.api.problems import problem_responses
from service.api.routes.fit import Jobs
from service.jobs.records import Job, JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, Path(description="the job id (16 hex digits)", json_schema_extra=JOB_ID_SCHEMA)]
CANCEL_WAIT_S = 10.0
EVENT_STREAM = "text/event-stream"


@router.get("", response_model=JobList, responses=problem_responses(422))
async def list_jobs(
    _: ReadAccess,
    jobs: Jobs,
    model: Annotated[str | None, Query(description="only this model's jobs")] = None,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
) -> JobList:
    return JobList(jobs=await run_in_threadpool(jobs.list, model, state))


@router.get("/{job_id}", response_model=Job, responses=problem_responses(404, 422))
async def get_job(_: ReadAccess, job_id: JobId, jobs: Jobs) -> Job:
    return await run_in_threadpool(jobs.get, job_id)


@router.delete(
    "/{job_id}",
    response_model=Job,
    responses={
        200: {"model": Job, "description": "The job ended (cancelled, or it finished before the cancel took)"},
        202: {"model": Job, "description": "Cancel requested; the job (of another replica) ends soon"},
        **problem_responses(401, 403, 404, 409, 422, 429),
    },
)
async def cancel_job(_: WriteAccess, job_id: JobId, jobs: Jobs) -> JSONResponse:
    """Cancel a queued or running job: its partial work is discarded and the active state stays. 409 when the
    job already ended."""
    local = await run_in_threadpool(jobs.cancel, job_id)
    if local:
        await jobs.wait(job_id, CANCEL_WAIT_S)
    job = await run_in_threadpool(jobs.get, job_id)
    return JSONResponse(job.model_dump(mode="json"), status_code=200 if job.finished else 202)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `progress` events (data: the job), then one `job` event (the final "
            "job); `: keep-alive` comments while nothing happens. Send `Last-Event-ID` to resume.",
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
        },
        **problem_responses(404, 422),
    },
)
async def job_events(
    _: ReadAccess,
    job_id: JobId,
    jobs: Jobs,
    last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None,
) -> StreamingResponse:
    events = await run_in_threadpool(jobs.events, job_id)
    after = int(last_event_id) if last_event_id is not None and last_event_id.isdigit() else 0

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        async for event in events.stream(after):
            if event is None:
                yield b": keep-alive\n\n"
            else:
                yield f"id: {event.seq}\nevent: {event.kind}\ndata: {event.data}\n\n".encode()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type=EVENT_STREAM, headers=headers)
