"""ASGI middleware: request id (``X-Request-ID``), body-size limit and deadline, ``server`` header, request metrics
and one JSON access log line.

The body limit is enforced on the bytes actually received (``Content-Length`` is checked on the first read): an
oversized body raises :class:`~service.errors.PayloadTooLargeError` inside the route, so it is answered through
the app's exception table like every other error. The body must also arrive at a minimum rate: all of it within
``body_grace_s + max(Content-Length, bytes received) / body_min_rate`` seconds of the request's start, else
:class:`~service.errors.RequestTimeoutReadingBodyError` (408, and the connection is closed). Together with the
head deadline of :mod:`service.api.http_protocol` this bounds how long a slow client holds a connection.

Request ids: an incoming printable ``X-Request-ID`` of 1-128 characters is kept (so a caller's id follows the
request through the logs); otherwise the id is 32 hex digits, a random 64-bit prefix drawn once per process
followed by a 64-bit counter: unique within the process, practically unique across processes, and ~10x cheaper
than ``uuid4`` (which reads ``os.urandom`` on every request). Request ids are correlation ids, not secrets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLargeError, RequestTimeoutReadingBodyError
from service.logs import request_id_var
from service.metrics import ServiceMetrics

logger = logging.getLogger("service.access")
STATE_UPLOAD = re.compile(r"/v1/models/[^/]+/detectors/[^/]+")
"""Paths whose ``PUT`` is a detector state upload (limited by ``max_state_bytes``, not ``max_body_bytes``)."""
FIT_UPLOAD = re.compile(r"/v1/models/[^/]+/detectors/[^/]+/fit")
"""Paths whose ``POST`` starts a fit job (limited by ``max_fit_bytes``: an archive spooled to disk; the route keeps
the in-memory forms within ``max_body_bytes`` itself)."""


class RequestIds:
    """``<16 hex: random per process><16 hex: counter>``; a forked child draws a new prefix on first use."""

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count(1)

    def next(self) -> str:
        if self._pid != os.getpid():
            self._pid, self._prefix, self._counter = os.getpid(), os.urandom(8).hex(), itertools.count(1)
        return f"{self._prefix}{next(self._counter):016x}"


_request_ids = RequestIds()


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


SERVER_HEADER = (b"server", b"ood-serve")


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        max_body_bytes: int,
        max_state_bytes: int,
        body_grace_s: float = 15.0,
        body_min_rate: float = 256 * 1024,
        max_fit_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_state_bytes = max_state_bytes
        self.max_fit_bytes = max_fit_bytes if max_fit_bytes is not None else max_body_bytes
        self.body_grace_s = body_grace_s
        self.body_min_rate = body_min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = declared = ""
        for key, value in scope.get("headers", ()):  # ASGI header names are lower-case bytes
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
            elif key == b"content-length":
                declared = value.decode("latin-1")
        request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else _request_ids.next()
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        upload = scope["method"] == "PUT" and STATE_UPLOAD.fullmatch(scope["path"]) is not None
        limit = self.max_state_bytes if upload else self.max_body_bytes
        if scope["method"] == "POST" and FIT_UPLOAD.fullmatch(scope["path"]) is not None:
            limit = self.max_fit_bytes
        expected = int(declared) if declared.isdigit() else 0
        received = 0
        body_done = False
        opened = asyncio.get_running_loop().time()

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if expected > limit:
                raise PayloadTooLargeError(f"request body of {expected} bytes exceeds the limit of {limit} bytes")
            if body_done:  # e.g. waiting for a disconnect: no deadline
                return await receive()
            deadline = opened + self.body_grace_s + max(received, expected) / self.body_min_rate
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutReadingBodyError(
                    f"the request body did not arrive in time ({received} bytes in {self.body_grace_s:.0f} s + "
                    f"{self.body_min_rate / 1024:.0f} KiB/s)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                    SERVER_HEADER,
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.observe_request(scope["method"], route, status, seconds)
            if logger.isEnabledFor(logging.INFO):
                extra = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                }
                logger.info("request", extra=extra)
            request_id_var.reset(token)
