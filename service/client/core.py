"""What the sync and async clients share: each operation as a :class:`Call` (method, path, query, body and how to
read the answer), the retry rule, and the reading of a fit job's event stream.

Retries (:class:`Retry`): a 429 (queue full, fit-job queue full, too many failed keys) or 503 (warming up,
shutting down) answer means the service did no work, so any request is sent again, at most ``attempts`` times in
all. The wait is the answer's ``Retry-After`` (seconds or an HTTP date), else ``backoff_s * 2 ** n``; no jitter. A
``Retry-After`` longer than ``max_wait_s`` is not shortened: the error is raised at once. A connection that could
not be opened (nothing was sent) is retried the same way.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from service.api.job_schemas import JobList, VersionList
from service.api.schemas import (
    DetectorInfo,
    DetectorList,
    DriftResponse,
    ModelInfo,
    ModelList,
    ScoreResponse,
    SegmentResponse,
)
from service.client.images import Images, encode_images
from service.jobs.records import Job

T = TypeVar("T")
ARCHIVE_TYPES = {
    ".zip": "application/zip",
    ".tar": "application/x-tar",
    ".tar.gz": "application/gzip",
    ".tgz": "application/gzip",
    ".safetensors": "application/octet-stream",
}
"""Raw fit data by file name ending -> content type (the service also reads the archive's first bytes)."""
UPLOAD_CHUNK = 1 << 20


@dataclass(frozen=True)
class Retry:
    """How 429 / 503 answers and refused connections are retried (see the module docstring)."""

    attempts: int = 5
    """Sends in all (1: never retry)."""
    max_wait_s: float = 60.0
    """Longest single wait; a longer ``Retry-After`` is raised at once."""
    backoff_s: float = 0.5
    """First wait when the answer gives no ``Retry-After``, doubled each time."""
    statuses: tuple[int, ...] = (429, 503)

    def wait_s(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before send number ``attempt + 1`` (``attempt`` sends done), or ``None``: give up."""
        if attempt >= self.attempts or (response is not None and response.status_code not in self.statuses):
            return None
        header = response.headers.get("retry-after") if response is not None else None
        wait = retry_after_s(header) if header else None
        if wait is None:
            wait = self.backoff_s * 2 ** (attempt - 1)
            return min(wait, self.max_wait_s)
        return wait if wait <= self.max_wait_s else None


def retry_after_s(value: str) -> float | None:
    """``Retry-After``: delay-seconds or an HTTP date (RFC 9110 10.2.3); ``None`` when unreadable."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read(model: type[T]) -> Callable[[httpx.Response], T]:
    adapter = TypeAdapter(model)
    return lambda response: adapter.validate_json(response.content)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP operation: what to send and how to read a successful answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Mapping[str, str | None] = field(default_factory=dict)
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: Mapping[str, str | list[str]] | None = None
    content: bytes | None = None
    upload: Path | None = None
    """A file streamed as the raw body (reopened for every send)."""
    headers: Mapping[str, str] = field(default_factory=dict)

    def request_kwargs(self) -> dict[str, Any]:
        """``httpx`` arguments except a streamed ``upload`` (the transports open it)."""
        kwargs: dict[str, Any] = {"params": {k: v for k, v in self.params.items() if v is not None}}
        if self.headers:
            kwargs["headers"] = dict(self.headers)
        for name in ("json", "files", "data", "content"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs


def _name(value: str) -> str:
    return quote(value, safe="")


def _flag(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _none(response: httpx.Response) -> None:
    return None


def list_models() -> Call[list[ModelInfo]]:
    read = _read(ModelList)
    return Call("GET", "/v1/models", lambda r: read(r).models)


def get_model(model: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{_name(model)}", _read(ModelInfo))


def list_detectors(model: str) -> Call[list[DetectorInfo]]:
    read = _read(DetectorList)
    return Call("GET", f"/v1/models/{_name(model)}/detectors", lambda r: read(r).detectors)


def _scoring_params(detectors: str | list[str] | None, threshold: float | None, tpr: float | None) -> dict[str, Any]:
    names = ",".join(detectors) if isinstance(detectors, (list, tuple)) else detectors
    return {"detectors": names, "threshold": _flag(threshold), "tpr": _flag(tpr)}


def score(
    model: str, images: Images, detectors: str | list[str] | None, threshold: float | None, tpr: float | None
) -> Call[ScoreResponse]:
    files = [("files", image) for image in encode_images(images)]
    params = _scoring_params(detectors, threshold, tpr)
    return Call("POST", f"/v1/models/{_name(model)}/score", _read(ScoreResponse), params=params, files=files)


def segment(
    model: str,
    images: Images,
    detectors: str | list[str] | None,
    threshold: float | None,
    tpr: float | None,
    format: str | None,
    size: str | None,
) -> Call[SegmentResponse]:
    files = [("files", image) for image in encode_images(images)]
    params = {**_scoring_params(detectors, threshold, tpr), "format": format, "size": size}
    return Call("POST", f"/v1/models/{_name(model)}/segment", _read(SegmentResponse), params=params, files=files)


def _state_path(model: str, name: str) -> str:
    return f"/v1/models/{_name(model)}/detectors/{_name(name)}"


def upload_state(model: str, name: str, state: bytes | str | Path) -> Call[DetectorInfo]:
    """``state``: the ``save_detector`` bytes or the path of its file (streamed)."""
    headers = {"Content-Type": "application/octet-stream"}
    path = _state_path(model, name)
    if isinstance(state, (bytes, bytearray, memoryview)):
        return Call("PUT", path, _read(DetectorInfo), content=bytes(state), headers=headers)
    return Call("PUT", path, _read(DetectorInfo), upload=Path(state), headers=headers)


def download_state(model: str, name: str) -> Call[bytes]:
    return Call("GET", _state_path(model, name), lambda r: r.content)


def delete_state(model: str, name: str) -> Call[None]:
    return Call("DELETE", _state_path(model, name), _none)


def versions(model: str, name: str) -> Call[VersionList]:
    return Call("GET", _state_path(model, name) + "/versions", _read(VersionList))


def rollback(model: str, name: str, version: int) -> Call[DetectorInfo]:
    return Call("POST", _state_path(model, name) + "/rollback", _read(DetectorInfo), json={"version": version})


def start_fit(
    model: str,
    name: str,
    parameters: Mapping[str, Any],
    archive: str | Path | None = None,
    source: str | None = None,
    images: Images | None = None,
    labels: list[int] | None = None,
) -> Call[Job]:
    """A fit job on exactly one of: ``archive`` (a local zip / tar / tar.gz of class folders, or a safetensors of
    outputs, streamed as the raw body), ``source`` (a path under the server's ``OOD_FIT_DATA_ROOT``) or ``images``
    with their ``labels`` (class index, < 0 = OOD; a small set, sent as multipart)."""
    given = [n for n, v in (("archive", archive), ("source", source), ("images", images)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of archive, source or images (got {', '.join(given) or 'none'})")
    path = f"{_state_path(model, name)}/fit"
    params = {k: json.dumps(v) if k == "hparams" else _flag(v) for k, v in parameters.items() if v is not None}
    if archive is not None:
        file = Path(archive)
        kind = next((t for end, t in ARCHIVE_TYPES.items() if file.name.lower().endswith(end)), None)
        if kind is None:
            raise ValueError(f"{file.name}: fit data must end with one of {', '.join(ARCHIVE_TYPES)}")
        return Call("POST", path, _read(Job), params=params, upload=file, headers={"Content-Type": kind})
    if source is not None:
        return Call("POST", path, _read(Job), params=params, json={"source": source})
    encoded = encode_images(images)  # type: ignore[arg-type]  # not None here
    if labels is None or len(labels) != len(encoded):
        raise ValueError(f"give one label per image ({len(encoded)} images, {len(labels or [])} labels)")
    files = [("files", image) for image in encoded]
    return Call("POST", path, _read(Job), params=params, files=files, data={"labels": ",".join(map(str, labels))})


def list_jobs(model: str | None, state: str | None) -> Call[list[Job]]:
    read = _read(JobList)
    return Call("GET", "/v1/jobs", lambda r: read(r).jobs, params={"model": model, "state": state})


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{_name(job_id)}", _read(Job))


def cancel_job(job_id: str) -> Call[Job]:
    return Call("DELETE", f"/v1/jobs/{_name(job_id)}", _read(Job))


def job_events_path(job_id: str) -> str:
    return f"/v1/jobs/{_name(job_id)}/events"


def drift(model: str) -> Call[DriftResponse]:
    return Call("GET", f"/v1/models/{_name(model)}/drift", _read(DriftResponse))
