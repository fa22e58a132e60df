"""uvicorn's httptools protocol with the slow-client and connection defences uvicorn lacks.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but not a request head that trickles in one
byte at a time, nor the size or number of header fields, and its ``limit_concurrency`` answers a plain-text 503
only once a request's head is complete. This subclass adds, per connection:

* a connection limit: past ``max_connections`` open connections a new one is answered at once with a 503
  problem+json body and closed, so its file descriptor is freed within :data:`LINGER_S`;
* a head deadline: from the first byte of a request, its request line and headers must arrive within
  ``header_timeout_s`` (else 408 and close);
* head bounds: at most ``max_header_bytes`` bytes of request line and headers and ``max_headers`` fields (else 431
  and close), checked once the head is parsed, and on the raw bytes of a head that does not end;

a rejected connection is half-closed after its answer and its input discarded for :data:`LINGER_S` before the
close (a "lingering close", as nginx does, so the client reads the answer instead of a reset), and every rejection
is counted (``on_reject``, a Prometheus counter) and logged at most once every 10 s per
reason with the number seen meanwhile. The body's own deadline (a minimum data rate) is enforced by
:mod:`service.api.middleware`. Written here because uvicorn offers no such hooks; it relies on
``HttpToolsProtocol``'s parser callbacks, which the tests pin over real sockets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("service.http")
SERVER_NAME = "ood-serve"
LINGER_S = 1.0
"""How long a rejected connection's further input is read and discarded before it is closed."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    max_header_bytes: int
    max_headers: int


def raw_problem(status: int, title: str, detail: str) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection."""
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n"
        f"server: {SERVER_NAME}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _RejectionLog:
    """One log line per reason at most every ``interval_s``, saying how many were rejected since the last."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def note(self, reason: str, detail: str) -> None:
        self._count[reason] = self._count.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -self.interval_s) >= self.interval_s:
            logger.warning(
                "connection rejected", extra={"reason": reason, "detail": detail, "count": self._count[reason]}
            )
            self._last[reason], self._count[reason] = now, 0


def guarded_protocol(limits: ConnectionLimits, on_reject: Callable[[str], None] | None = None) -> type[Any]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``."""
    log = _RejectionLog()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: Any = None
        _reading_head = True
        _head_bytes = 0
        _rejected = False

        def _reject(self, status: int, reason: str, detail: str) -> None:
            if self._rejected:
                return
            self._rejected = True
            self._cancel_head_timer()
            log.note(reason, detail)
            if on_reject is not None:
                on_reject(reason)
            if not self.transport.is_closing():
                self.transport.write(raw_problem(status, HTTPStatus(status).phrase, detail))
                # lingering close: half-close and discard what the client still sends for a moment, so that the
                # answer is read before the close (closing with unread input would reset the connection)
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._reading_head:
                self._reject(408, "header_timeout", f"request headers not received within {limits.header_timeout_s} s")

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._reject(
                    503, "connection_limit", f"more than {limits.max_connections} open connections; retry later"
                )

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return
            if self._reading_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if not self._reading_head or self._rejected:
                return
            # still in the head after this read (these bytes are all head): bound it, and give it its deadline;
            # a head that arrived whole (the usual case) costs no timer
            if self._head_bytes > limits.max_header_bytes + 65536:  # a head that never ends
                self._reject(431, "header_size", f"request headers exceed {limits.max_header_bytes} bytes")
            elif self._head_timer is None and self._head_bytes:
                self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def on_message_begin(self) -> None:
            self._reading_head, self._head_bytes = True, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._reading_head = False
            if self._head_timer is not None:
                self._cancel_head_timer()
            headers = self.headers
            if len(headers) > limits.max_headers:
                self._reject(431, "header_count", f"more than {limits.max_headers} header fields")
            elif len(self.url) + sum(len(n) + len(v) + 4 for n, v in headers) > limits.max_header_bytes:
                self._reject(431, "header_size", f"request headers exceed {limits.max_header_bytes} bytes")
            if self._rejected:
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._rejected:
                super().on_message_complete()

    return GuardedHttpToolsProtocol
