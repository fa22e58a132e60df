"""POST /v1/models/{model}/detectors/{name}/fit: start a fit job (202 + ``Location: /v1/jobs/{id}``).

The job's place in the model's queue is reserved first (429 when full: no upload is read for nothing), the
parameters are checked (400 / 422 at once, before a raw archive is read when they come in the query), then the
data is spooled or resolved (:mod:`service.api.fit_uploads`, :mod:`service.jobs.data`) and the job queued
(:mod:`service.jobs.manager`). Whatever fails before the job is queued leaves no spool and no record.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

import ood_core.detector as detector_package
from ood_core.api import Detector
from service.api.deps import DetectorName, Model, Services, WriteAccess
from service.api.fit_uploads import FitUpload, read_fit_body
from service.api.problems import problem_responses
from service.api.schemas import FIT_BODY
from service.engine.served_model import ServedModel
from service.errors import BadRequestError, ServiceError
from service.fit.detectors import new_detector
from service.fit.grid import check_grid, is_grid
from service.jobs.data import IMAGES_NAME, data_root_path, write_image_shard
from service.jobs.journal import new_job_id
from service.jobs.manager import JobManager
from service.jobs.records import DataKind, FitParameters, Job, JobRecord, utc_now
from service.states.validate import check_servable

router = APIRouter(prefix="/v1/models/{model}/detectors", tags=["jobs"])
PARAMETERS = tuple(FitParameters.model_fields)


async def get_jobs(request: Request) -> JobManager:
    jobs: JobManager = request.app.state.jobs
    return jobs


Jobs = Annotated[JobManager, Depends(get_jobs)]


def servable_classes(model: ServedModel) -> list[str]:
    """The detector classes ``model`` can serve."""
    names = []
    for name in detector_package.__all__:
        cls = getattr(detector_package, name, None)
        if isinstance(cls, type) and issubclass(cls, Detector):
            try:
                check_servable(model, cls)
            except ServiceError:
                continue
            names.append(name)
    return sorted(names)


def parse_parameters(values: dict[str, Any], default_share: float) -> FitParameters:
    """The job's parameters from query / form / JSON values; 400 naming the bad one."""
    values = {k: v for k, v in values.items() if k in PARAMETERS}
    if "detector_class" not in values:
        raise BadRequestError("give the detector class in 'detector_class' (e.g. Mahalanobis)")
    if isinstance(values.get("hparams"), str):
        try:
            values["hparams"] = json.loads(values["hparams"]) if values["hparams"].strip() else {}
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"'hparams' is not valid JSON: {exc}") from exc
    values.setdefault("calibration_share", default_share)
    try:
        return FitParameters.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"'{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"bad fit parameters: {problems}") from None


def check_detector(model: ServedModel, params: FitParameters) -> None:
    """Build the detector once, unfitted (each candidate of a grid until one builds): 400 for an unknown class
    (listing the ones this model serves), bad hyperparameters or a bad grid, 422 for a class the model cannot
    serve."""
    if params.detector_class not in detector_package.__all__:
        raise BadRequestError(
            f"unknown detector class {params.detector_class[:64]!r}; model {model.name!r} can fit: "
            f"{', '.join(servable_classes(model))}"
        )
    if is_grid(params.hparams):
        check_grid(model, params.detector_class, dict(params.hparams))
    else:
        new_detector(model, params.detector_class, dict(params.hparams))


def _labels(upload: FitUpload, model: ServedModel) -> list[int]:
    try:
        labels = [int(v) for v in upload.labels]
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"labels must be integers (class index, < 0 for OOD): {exc}") from exc
    if len(labels) != len(upload.images):
        raise BadRequestError(f"{len(labels)} labels for {len(upload.images)} images")
    classes = len(model.labels)
    if any(v >= classes for v in labels):
        raise BadRequestError(f"labels must be < {classes} (the model's classes) or < 0 for OOD")
    return [max(v, -1) for v in labels]


def _data(upload: FitUpload, job_id: str, services: Services, model: ServedModel) -> tuple[DataKind, str | None]:
    """The job's data kind and spool name (or data-root path, checked); 400 when there is none or several."""
    given = [k for k, v in (("archive", upload.archive), ("source", upload.source), ("images", upload.images)) if v]
    if len(given) != 1:
        raise BadRequestError(
            "send the fit data once: an archive body, a multipart 'file', 'files' + 'labels', or JSON "
            f"{{'source': ...}} or {{'instances': [...]}} (got {', '.join(given) or 'none'})"
        )
    if upload.archive is not None:
        return ("outputs" if upload.archive.endswith(".safetensors") else "archive"), f"{job_id}/{upload.archive}"
    if upload.source is not None:
        data_root_path(services.settings.fit_data_root, upload.source)
        return "source", upload.source
    return "images", f"{job_id}/{IMAGES_NAME}"


@router.post(
    "/{name}/fit",
    openapi_extra=FIT_BODY,
    status_code=202,
    response_model=Job,
    responses={
        202: {
            "model": Job,
            "description": "The job is queued; follow it at `Location` (/v1/jobs/{id}) or its /events stream",
            "headers": {"Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}}},
        },
        **problem_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 503, 507),
    },
)
async def start_fit(
    _: WriteAccess, model: Model, name: DetectorName, request: Request, services: Services, jobs: Jobs
) -> JSONResponse:
    """Fit ``name`` on ``model`` in a background job. Data: an archive as the raw body (zip, tar, tar.gz of class
    folders ``<class>/<image>`` plus optional ``ood/``; or a safetensors of precomputed outputs), a multipart
    ``file``, a multipart ``files`` + ``labels`` (small sets), JSON ``{"source": "relative/path"}`` under
    ``OOD_FIT_DATA_ROOT`` or JSON ``{"instances": [{"b64", "label"}]}``. Parameters in the query or the form /
    JSON: ``detector_class``, ``hparams`` (JSON; ``{"grid": {"k": [1, 5]}}`` searches the grid, keeps the best by
    AUROC on ``ood/`` and reports every candidate), ``calibration_share``, ``tpr``, ``seed``, ``skip_invalid``,
    ``batch_size``."""
    settings = services.settings
    query = dict(request.query_params)
    if "detector_class" in query:  # checked before any body is read
        await run_in_threadpool(check_detector, model, parse_parameters(query, settings.fit_calibration_share))
    with jobs.reserve(model.name):
        job_id = new_job_id()
        lock_fd = await run_in_threadpool(jobs.claim, job_id)
        queued = False
        try:
            spool = await run_in_threadpool(jobs.journal.spool_dir, job_id)
            upload = await read_fit_body(request, spool, settings.max_body_bytes, settings.max_fit_images)
            params = parse_parameters({**query, **upload.fields}, settings.fit_calibration_share)
            await run_in_threadpool(check_detector, model, params)
            kind, where = _data(upload, job_id, services, model)
            if kind == "images":
                labels = _labels(upload, model)
                await run_in_threadpool(write_image_shard, spool / IMAGES_NAME, upload.images, labels)
            record = JobRecord(
                id=job_id,
                model=model.name,
                detector=name,
                detector_class=params.detector_class,
                state="queued",
                data=kind,
                parameters=params,
                created_at=utc_now(),
                spool=where if kind != "source" else None,
                source=where if kind == "source" else None,
            )
            job = await run_in_threadpool(jobs.submit, record, lock_fd)
            queued = True
        finally:
            if not queued:
                await run_in_threadpool(jobs.abandon, job_id, lock_fd)
    return JSONResponse(job.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
