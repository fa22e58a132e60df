"""Stream a state upload's body into a file on the state volume, never holding it whole in memory.

The raw body (``application/octet-stream``, ``application/x-safetensors``, no content type, or
``application/x-www-form-urlencoded``: what ``curl --data-binary @state.safetensors`` sends unless told otherwise;
an upload has no form fields, so such a body can only be the file) is written as it arrives; a ``multipart/form-data`` body goes through python-multipart's streaming parser and only the data of its
``file`` (or ``state``) part is written. Writes are batched to :data:`WRITE_BYTES` and done in the thread pool, so
a slow volume never blocks the event loop. The size limit and the body deadline are the middleware's
(:mod:`service.api.middleware`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.api.bodies import media_type
from service.api.multipart import boundary_of
from service.errors import BadRequestError, UnsupportedMediaTypeError

WRITE_BYTES = 1 << 20
RAW_TYPES = ("", "application/octet-stream", "application/x-safetensors", "application/x-www-form-urlencoded")
FILE_PARTS = ("file", "state")


class _Writer:
    """Batches chunks into writes of about :data:`WRITE_BYTES` done in the thread pool."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.pending: list[bytes] = []
        self.size = 0
        self.total = 0

    def add(self, data: bytes) -> None:
        self.pending.append(data)
        self.size += len(data)
        self.total += len(data)

    async def flush(self, force: bool = False) -> None:
        if self.pending and (force or self.size >= WRITE_BYTES):
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending, self.size = [], 0
            await run_in_threadpool(self.file.write, data)


class _FilePart:
    """python-multipart callbacks that keep only the data of the first ``file`` / ``state`` part."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self.field = b""
        self.headers: dict[bytes, bytes] = {}
        self.current: bytes = b""
        self.in_file = False
        self.found = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.headers, self.field, self.current = {}, b"", b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.current += data[start:end]

    def header_end(self) -> None:
        self.headers[self.field.strip().lower()] = self.current.strip()
        self.field, self.current = b"", b""

    def headers_finished(self) -> None:
        kind, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self.in_file = not self.found and kind.lower() == b"form-data" and name in FILE_PARTS and b"filename" in params

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.writer.add(data[start:end])

    def part_end(self) -> None:
        if self.in_file:
            self.found, self.in_file = True, False


async def parse_multipart(request: Request, callbacks: dict[str, object], flush: Callable[[], Awaitable[None]]) -> None:
    """Feed the ``multipart/form-data`` body of ``request`` to python-multipart's streaming parser with
    ``callbacks`` as it arrives, awaiting ``flush()`` after each chunk; 400 for a malformed body."""
    parser = MultipartParser(boundary_of(request.headers.get("content-type", "")), callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            await flush()
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from None


async def stream_state(request: Request, file: BinaryIO) -> int:
    """Write the state file of ``request`` into ``file``; its size in bytes. 400 for a multipart body without a
    ``file`` part, 415 for other content types (checked before the body is read)."""
    kind = media_type(request)
    writer = _Writer(file)
    if kind in RAW_TYPES:
        async for chunk in request.stream():
            writer.add(chunk)
            await writer.flush()
    elif kind == "multipart/form-data":
        part = _FilePart(writer)
        await parse_multipart(request, part.callbacks(), writer.flush)
        if not part.found:
            raise BadRequestError("multipart upload needs the state in a 'file' part (with a filename)")
    else:
        raise UnsupportedMediaTypeError(
            f"content type {kind or '(none)'!r} is not accepted; send the safetensors state as "
            "application/octet-stream or as a multipart 'file' part"
        )
    await writer.flush(force=True)
    await run_in_threadpool(file.flush)
    return writer.total
