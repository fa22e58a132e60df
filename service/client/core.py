"""What the sync and async clients share, so that they only do the I/O: each operation as a :class:`Call` (method,
path, query, body and how to read the answer) with its options (:class:`ScoreOptions`, :class:`SegmentOptions`,
:class:`FitOptions`); the retry rule and the decision after each failed send are :mod:`service.client.retries`'
(:class:`Retry`, :class:`Attempts`, imported here too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar
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
from service.client.retries import Attempts, Retry, retry_after_s
from service.jobs.records import Job

__all__ = ["Attempts", "Call", "FitOptions", "Retry", "ScoreOptions", "SegmentOptions", "retry_after_s"]
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


class ScoreOptions(TypedDict, total=False):
    """What ``score`` takes besides the model and images: the detectors to run (default: the model's default one),
    an absolute ``threshold`` or a target ``tpr`` for the verdicts."""

    detectors: str | list[str] | None
    threshold: float | None
    tpr: float | None


class SegmentOptions(ScoreOptions, total=False):
    """``segment``'s options: those of ``score``, the maps' ``format`` (png, npy, json) and ``size``."""

    format: str | None
    size: str | None


def _options(options: Mapping[str, Any], kind: type, operation: str) -> dict[str, Any]:
    """``options`` with every key of the TypedDict ``kind`` (``None`` when not given); a key it does not have is a
    ``TypeError``, as a misspelt keyword argument is."""
    known: frozenset[str] = kind.__optional_keys__  # type: ignore[attr-defined]
    if unknown := sorted(set(options) - known):
        raise TypeError(f"{operation}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    return {key: options.get(key) for key in kind.__annotations__}


def _scoring_params(options: Mapping[str, Any]) -> dict[str, Any]:
    detectors = options["detectors"]
    names = ",".join(detectors) if isinstance(detectors, (list, tuple)) else detectors
    return {"detectors": names, "threshold": _flag(options["threshold"]), "tpr": _flag(options["tpr"])}


def score(model: str, images: Images, options: ScoreOptions) -> Call[ScoreResponse]:
    params = _scoring_params(_options(options, ScoreOptions, "score"))
    files = [("files", image) for image in encode_images(images)]
    return Call("POST", f"/v1/models/{_name(model)}/score", _read(ScoreResponse), params=params, files=files)


def segment(model: str, images: Images, options: SegmentOptions) -> Call[SegmentResponse]:
    given = _options(options, SegmentOptions, "segment")
    files = [("files", image) for image in encode_images(images)]
    params = {**_scoring_params(given), "format": given["format"], "size": given["size"]}
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


class FitOptions(TypedDict, total=False):
    """What ``start_fit`` and ``fit`` take besides the model, the detector name, the ``archive`` and the class: the
    data as ``source`` or ``images`` with ``labels`` instead of an archive, and the job's parameters (unset: the
    service's defaults)."""

    source: str | None
    images: Images | None
    labels: list[int] | None
    hparams: dict[str, Any] | None
    calibration_share: float | None
    tpr: float | None
    seed: int | None
    skip_invalid: bool | None
    batch_size: int | None


def start_fit(model: str, name: str, archive: str | Path | None, detector_class: str, options: FitOptions) -> Call[Job]:
    """A fit job (202) of ``detector_class`` on exactly one of: ``archive`` (a local zip / tar / tar.gz of class
    folders, or a safetensors of outputs, streamed as the raw body), ``source`` (a path under the server's
    ``OOD_FIT_DATA_ROOT``) or ``images`` with their ``labels`` (class index, < 0 = OOD; a small set, sent as
    multipart)."""
    given = _options(options, FitOptions, "start_fit")
    source, images, labels = given.pop("source"), given.pop("images"), given.pop("labels")
    parameters = {"detector_class": detector_class, **given}
    data = [n for n, v in (("archive", archive), ("source", source), ("images", images)) if v is not None]
    if len(data) != 1:
        raise ValueError(f"give exactly one of archive, source or images (got {', '.join(data) or 'none'})")
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
