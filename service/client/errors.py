"""What the client raises: :class:`ProblemError` for every error answer, carrying the service's
``application/problem+json`` body (RFC 9457) as a typed :class:`~service.api.schemas.Problem`."""

from __future__ import annotations

import json

import httpx

from service.api.schemas import Problem

MAX_DETAIL_CHARS = 500


class OODClientError(Exception):
    """Base class of the client's errors."""


class ProblemError(OODClientError):
    """An error answer of the service (4xx / 5xx): ``problem`` is its body; ``attempts`` how many times the
    request was sent (more than 1 after retries on 429 / 503)."""

    def __init__(self, problem: Problem, *, method: str, url: str, headers: httpx.Headers, attempts: int = 1) -> None:
        self.problem = problem
        self.method = method
        self.url = url
        self.headers = headers
        self.attempts = attempts
        request = f", request {problem.request_id}" if problem.request_id else ""
        super().__init__(f"{problem.status} {problem.title}: {problem.detail} ({method} {problem.instance}{request})")

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def detail(self) -> str:
        return self.problem.detail

    @property
    def retry_after(self) -> str | None:
        """The answer's ``Retry-After`` header (429 / 503), as sent."""
        return self.headers.get("retry-after")

    @classmethod
    def from_response(cls, response: httpx.Response, attempts: int = 1) -> ProblemError:
        """The problem body of ``response``; an answer that is not problem+json (a proxy's HTML page, say) becomes
        a problem with its status, reason phrase and the start of its text."""
        return cls(
            _problem(response),
            method=response.request.method,
            url=str(response.request.url),
            headers=response.headers,
            attempts=attempts,
        )


def _problem(response: httpx.Response) -> Problem:
    content_type = response.headers.get("content-type", "")
    if "json" in content_type:
        try:
            body = json.loads(response.content)
            if isinstance(body, dict) and "title" in body and "status" in body:
                body.setdefault("detail", "")
                body.setdefault("instance", response.request.url.path)
                return Problem.model_validate(body)
        except (ValueError, TypeError):
            pass
    return Problem(
        type="about:blank",
        title=response.reason_phrase or "error",
        status=response.status_code,
        detail=response.text[:MAX_DETAIL_CHARS].strip(),
        instance=response.request.url.path,
        request_id=response.headers.get("x-request-id"),
    )
