"""The retry rule of both clients (:class:`Retry`) and the decision after each failed send of one request
(:class:`Attempts`: wait, or raise the error with its problem body).

A 429 (queue full, fit-job queue full, too many failed keys) or 503 (warming up, shutting down) answer means the
service did no work, so any request is sent again, at most ``attempts`` times in all. The wait is the answer's
``Retry-After`` (seconds or an HTTP date, :func:`retry_after_s`), else ``backoff_s * 2 ** n``; no jitter. A
``Retry-After`` longer than ``max_wait_s`` is not shortened: the error is raised at once. A connection that could
not be opened (nothing was sent) is retried the same way.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import httpx

from service.client.errors import ProblemError


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


class Attempts:
    """The sends of one request under ``retry``: after each failed send, the seconds to wait before the next one,
    or the error raised (the transport's when the connection could not be opened, else a :class:`ProblemError`)."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.sent = 0

    def after_refused(self, error: httpx.TransportError) -> float:
        """A connection that could not be opened (nothing was sent): the wait, or ``error`` raised."""
        self.sent += 1
        wait = self.retry.wait_s(self.sent, None)
        if wait is None:
            raise error
        return wait

    def after_answer(self, response: httpx.Response) -> float:
        """An error answer (read): the wait, or its :class:`ProblemError` raised."""
        self.sent += 1
        wait = self.retry.wait_s(self.sent, response)
        if wait is None:
            raise ProblemError.from_response(response, self.sent)
        return wait


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
