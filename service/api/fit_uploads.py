"""Read the body of ``POST .../fit``: the job's data and its parameters, streaming large data to the job's spool.

* A raw archive (``application/zip``, ``application/x-tar``, ``application/gzip``; also ``application/octet-stream``
  and ``application/x-safetensors`` for outputs) is written to the spool as it arrives (batched writes in the
  thread pool, never whole in memory) and named by its first bytes (:func:`service.jobs.data.sniff_suffix`).
* ``multipart/form-data``: a ``file`` part is spooled the same way; ``files`` parts (the small form, with
  ``labels``) and text fields are kept in memory within ``max_small_bytes`` (``OOD_MAX_BODY_MB``) and
  ``max_images`` (``OOD_MAX_FIT_IMAGES``). python-multipart's streaming parser splits the parts.
* ``application/json``: ``{"source": "relative/path", ...}`` or ``{"instances": [{"b64", "label"}], ...}``, read
  within ``max_small_bytes``.

The whole body is limited by ``OOD_MAX_FIT_UPLOAD_MB`` in the middleware (413).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.api.bodies import media_type
from service.api.uploads import parse_multipart
from service.errors import (
    BadRequestError,
    ImageDecodeError,
    PayloadTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from service.jobs.data import ARCHIVE_TYPES, SNIFF_BYTES, UPLOAD_NAMES, sniff_suffix, suffix_of_name

WRITE_BYTES = 1 << 20
INCOMING = ".incoming"
MAX_FIELD_BYTES = 1 << 20
"""Text fields of a multipart body together (detector_class, hparams, labels...)."""


@dataclass
class FitUpload:
    """What the body held."""

    fields: dict[str, Any] = field(default_factory=dict)
    """Form fields (the last value of each; ``labels``: every value) or JSON keys, besides the data."""
    archive: str | None = None
    """Name of the spooled archive / outputs file in the spool folder."""
    images: list[tuple[str, bytes]] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    source: str | None = None


class _Spooler:
    """Writes a stream to ``<spool>/.incoming`` in batched thread-pool writes; keeps its first bytes."""

    def __init__(self, spool: Path) -> None:
        self.path = spool / INCOMING
        self.file: BinaryIO | None = None
        self.pending: list[bytes] = []
        self.size = 0
        self.total = 0
        self.head = b""

    def add(self, data: bytes) -> None:
        if len(self.head) < SNIFF_BYTES:
            self.head += data[: SNIFF_BYTES - len(self.head)]
        self.pending.append(data)
        self.size += len(data)
        self.total += len(data)

    async def flush(self, force: bool = False) -> None:
        if self.pending and (force or self.size >= WRITE_BYTES):
            data = b"".join(self.pending)
            self.pending, self.size = [], 0
            if self.file is None:
                self.file = await run_in_threadpool(open, self.path, "wb")
            await run_in_threadpool(self.file.write, data)

    async def finish(self, declared: str) -> str:
        """Close the file and give it its kind's name; that name."""
        await self.flush(force=True)
        if self.file is None or not self.total:
            raise BadRequestError("the fit data is empty")
        await run_in_threadpool(self.file.close)
        name = UPLOAD_NAMES[sniff_suffix(self.head, declared)]
        await run_in_threadpool(self.path.rename, self.path.with_name(name))
        return name

    async def close(self) -> None:
        if self.file is not None and not self.file.closed:
            await run_in_threadpool(self.file.close)


class _Parts:
    """python-multipart callbacks: the ``file`` part to the spooler, ``files`` parts and fields to memory."""

    def __init__(self, spooler: _Spooler, max_small_bytes: int, max_images: int) -> None:
        self.spooler = spooler
        self.max_small_bytes, self.max_images = max_small_bytes, max_images
        self.upload = FitUpload()
        self.header, self.value = b"", b""
        self.headers: dict[bytes, bytes] = {}
        self.name, self.filename, self.data = "", "", bytearray()
        self.target = ""
        self.small_bytes = self.field_bytes = 0
        self.file_suffix = ""

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "header", self.header + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "value", self.value + d[s:e]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.headers, self.header, self.value, self.data = {}, b"", b"", bytearray()

    def header_end(self) -> None:
        self.headers[self.header.strip().lower()] = self.value.strip()
        self.header, self.value = b"", b""

    def headers_finished(self) -> None:
        kind, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        if kind.lower() != b"form-data" or b"name" not in params:
            raise BadRequestError("multipart part without 'Content-Disposition: form-data; name=...'")
        self.name = params[b"name"].decode("utf-8", "replace")
        filename = params.get(b"filename")
        self.filename = "" if filename is None else filename.decode("utf-8", "replace")
        if self.name == "file" and filename is not None:
            if self.upload.archive is not None or self.spooler.total:
                raise BadRequestError("send one 'file' part (the archive)")
            self.target, self.file_suffix = "file", suffix_of_name(self.filename)
        elif self.name == "files" and filename is not None:
            if len(self.upload.images) >= self.max_images:
                raise TooManyImagesError(f"more than {self.max_images} 'files' parts; send an archive as 'file'")
            self.target = "files"
        else:
            self.target = "field"

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.target == "file":
            self.spooler.add(chunk)
            return
        if self.target == "files":
            self.small_bytes += len(chunk)
            if self.small_bytes > self.max_small_bytes:
                raise PayloadTooLargeError(
                    f"'files' parts over {self.max_small_bytes} bytes; send larger sets as an archive ('file')"
                )
        else:
            self.field_bytes += len(chunk)
            if self.field_bytes > MAX_FIELD_BYTES:
                raise PayloadTooLargeError(f"form fields over {MAX_FIELD_BYTES} bytes")
        self.data += chunk

    def part_end(self) -> None:
        if self.target == "files":
            self.upload.images.append((self.filename or f"files[{len(self.upload.images)}]", bytes(self.data)))
        elif self.target == "field":
            text = self.data.decode("utf-8", "replace")
            if self.name == "labels":
                self.upload.labels.extend(v.strip() for v in text.split(",") if v.strip())
            else:
                self.upload.fields[self.name] = text
        self.target = ""


async def read_fit_body(request: Request, spool: Path, max_small_bytes: int, max_images: int) -> FitUpload:
    """The job's data (spooled under ``spool`` or in memory) and its fields; 415 for other content types (before
    the body is read), 400 for a body without data."""
    kind = media_type(request)
    spooler = _Spooler(spool)
    try:
        if kind in ARCHIVE_TYPES:
            async for chunk in request.stream():
                spooler.add(chunk)
                await spooler.flush()
            return FitUpload(archive=await spooler.finish(ARCHIVE_TYPES[kind]))
        if kind == "multipart/form-data":
            return await _multipart(request, spooler, max_small_bytes, max_images)
        if kind == "application/json":
            return await _json(request, max_small_bytes, max_images)
    finally:
        await spooler.close()
    raise UnsupportedMediaTypeError(
        f"content type {kind or '(none)'!r} is not accepted; send an archive (application/zip, application/x-tar, "
        "application/gzip), a multipart 'file' or 'files' + 'labels', or JSON with 'source' or 'instances'"
    )


async def _multipart(request: Request, spooler: _Spooler, max_small_bytes: int, max_images: int) -> FitUpload:
    parts = _Parts(spooler, max_small_bytes, max_images)
    await parse_multipart(request, parts.callbacks(), spooler.flush)
    upload = parts.upload
    if spooler.total:
        if upload.images:
            raise BadRequestError("send either an archive ('file') or images ('files' + 'labels'), not both")
        upload.archive = await spooler.finish(parts.file_suffix)
    if "source" in upload.fields:
        upload.source = str(upload.fields.pop("source"))
    return upload


async def _json(request: Request, max_small_bytes: int, max_images: int) -> FitUpload:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_small_bytes:
            raise PayloadTooLargeError(
                f"JSON body over {max_small_bytes} bytes; send larger sets as an archive or from the data root"
            )
        chunks.append(chunk)
    try:
        payload = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise BadRequestError("body is not valid JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequestError("JSON body must be an object: {'source': ...} or {'instances': [...]}, with parameters")
    upload = FitUpload()
    instances = payload.pop("instances", None)
    source = payload.pop("source", None)
    if source is not None and not isinstance(source, str):
        raise BadRequestError("'source' must be a string: a path relative to the data root")
    upload.source = source
    if instances is not None:
        if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
            raise BadRequestError("'instances' must be a list of {'b64': '<base64 image>', 'label': <int>}")
        if len(instances) > max_images:
            raise TooManyImagesError(f"{len(instances)} instances; the limit is {max_images}: send an archive")
        for index, instance in enumerate(instances):
            encoded = instance.get("b64")
            if not isinstance(encoded, str):
                raise BadRequestError(f"instances[{index}] has no string 'b64'")
            try:
                upload.images.append((f"instances[{index}]", base64.b64decode(encoded, validate=True)))
            except (binascii.Error, ValueError) as exc:
                raise ImageDecodeError(f"instances[{index}].b64 is not valid base64: {exc}") from exc
            upload.labels.append(instance.get("label"))
    upload.fields = payload
    return upload
