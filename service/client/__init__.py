"""``service.client``: a Python client of the ood-serve HTTP API (httpx), synchronous and asyncio.

    from service.client import OODClient

    with OODClient("http://127.0.0.1:8000", api_key="...") as client:
        answer = client.score("digits", ["digit.png", pil_image, array], detectors=["mahalanobis"])
        answer.results[0].detectors["mahalanobis"].is_ood
        job = client.fit("digits", "my-knn", "digits.zip", detector_class="KNN")  # a progress bar until it ends

Module map:

* :mod:`~service.client.sync` / :mod:`~service.client.aio`: :class:`OODClient` and :class:`AsyncOODClient`, the
  same operations: ``models``, ``model``, ``detectors``, ``score``, ``segment``, ``drift``, ``upload_state``,
  ``download_state``, ``delete_state``, ``versions``, ``rollback``, ``start_fit``, ``fit`` (start and follow with a
  tqdm bar), ``follow``, ``jobs``, ``job``, ``cancel_job``.
* :mod:`~service.client.core`: what both share: each operation as a request (:class:`~service.client.core.Call`)
  with its options; the clients only send and wait.
* :mod:`~service.client.retries`: the retry rule on 429 / 503 (:class:`Retry`: ``Retry-After`` honoured, bounded
  attempts and wait, no jitter) and the decision after each failed send (:class:`~service.client.retries.Attempts`).
* :mod:`~service.client.images`: images as paths, bytes, PIL images or numpy arrays -> multipart files;
  :func:`decode_map` turns a ``/segment`` map into an array.
* :mod:`~service.client.progress`: a job's Server-Sent Events -> a progress bar.
* :mod:`~service.client.errors`: :class:`ProblemError`, raised for every error answer, with its problem+json body.

Results are the service's own response models (:mod:`service.api.schemas`, :mod:`service.api.job_schemas`,
:class:`service.jobs.records.Job`): pydantic only; the client imports no FastAPI, Starlette, uvicorn or torch
(an import-linter contract).
"""

from service.api.job_schemas import DetectorVersion, VersionList
from service.api.schemas import (
    DetectorDrift,
    DetectorInfo,
    DriftResponse,
    ImageScore,
    ImageSegment,
    ModelInfo,
    PixelVerdict,
    Problem,
    ScoreResponse,
    SegmentResponse,
    Verdict,
)
from service.client.aio import AsyncOODClient
from service.client.core import Retry
from service.client.errors import OODClientError, ProblemError
from service.client.images import decode_map
from service.client.sync import OODClient
from service.jobs.records import Job, JobResult

__all__ = [
    "AsyncOODClient",
    "DetectorDrift",
    "DetectorInfo",
    "DetectorVersion",
    "DriftResponse",
    "ImageScore",
    "ImageSegment",
    "Job",
    "JobResult",
    "ModelInfo",
    "OODClient",
    "OODClientError",
    "PixelVerdict",
    "Problem",
    "ProblemError",
    "Retry",
    "ScoreResponse",
    "SegmentResponse",
    "Verdict",
    "VersionList",
    "decode_map",
]
