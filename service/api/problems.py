"""The ONE exception -> HTTP status table, the ``application/problem+json`` (RFC 9457) body, its handlers, and
the OpenAPI declaration of the error answers a route can give.

Library and service code raise exceptions (:mod:`service.errors`, the batcher's, ``ood_core``'s); nothing but this
table decides their status (in the spirit of KServe's ``exception_handlers``). An unexpected exception is a 500
whose body names neither its type nor its message, with ``Connection: close`` (the server drops the connection
after it). Every ``detail`` goes through :class:`Redactor`: no memory address, object repr or server path leaves
the server. A client that disconnected mid-body is logged as such and counted as 499 (nginx's "client closed
request"), never as a server error. Under ``/v2`` the body is the Open Inference Protocol's ``{"error": ...}``
instead (:func:`error_response`), with the same statuses.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ood_core.api import InvalidStateError
from service import errors
from service.engine.batcher import BatcherClosedError, QueueFullError, RequestTimeoutError
from service.fit.dist import RankFailedError
from service.fit.sources import DataSourceError
from service.jobs.errors import JobFinishedError, JobNotFoundError, JobQueueFullError, JobsClosedError
from service.logs import request_id_var
from service.settings import Settings, check_name

logger = logging.getLogger("service.app")
PROBLEM_JSON = "application/problem+json"

Handler = Callable[[Request, Exception], Awaitable[Response]]


def status_table() -> dict[type[Exception], tuple[int, str | None]]:
    """Every library and service exception the routes may raise -> (HTTP status, problem title; ``None``: the
    exception's own ``title``)."""
    return {
        errors.BadRequestError: (400, None),
        DataSourceError: (400, None),
        errors.AuthenticationRequiredError: (401, None),
        errors.ForbiddenError: (403, None),
        errors.ModelNotFoundError: (404, None),
        errors.DetectorNotFoundError: (404, None),
        JobNotFoundError: (404, None),
        JobFinishedError: (409, None),
        errors.RequestTimeoutReadingBodyError: (408, None),
        errors.PayloadTooLargeError: (413, None),
        errors.ResponseTooLargeError: (413, None),
        errors.TooManyImagesError: (413, None),
        errors.ImageTooLargeError: (413, None),
        errors.UnsupportedMediaTypeError: (415, None),
        errors.InvalidNameError: (422, None),
        errors.ImageDecodeError: (422, None),
        errors.WrongTaskError: (404, None),
        errors.UnservableDetectorError: (422, None),
        InvalidStateError: (422, "Invalid detector state"),
        RequestValidationError: (422, "Invalid request parameters"),
        QueueFullError: (429, "Too many requests: batch queue full"),
        errors.TooManyFailedAuthenticationsError: (429, None),
        JobQueueFullError: (429, None),
        errors.HeadersTooLargeError: (431, None),
        errors.NotReadyError: (503, None),
        BatcherClosedError: (503, "Service shutting down"),
        JobsClosedError: (503, None),
        RequestTimeoutError: (504, "Request timed out in the batch queue"),
        errors.InsufficientStorageError: (507, None),
        RankFailedError: (500, None),  # a distributed fit (ood-fit under torchrun); a server's jobs run one rank
        ClientDisconnect: (499, "Client closed request"),
    }


CLOSES_CONNECTION = (408, 499)
"""Statuses after which the connection is closed (the client is slow or gone), besides unexpected 500s."""


class Redactor:
    """Removes memory addresses, object reprs and server paths from a message."""

    _OBJECT = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
    _ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
    _PATH = re.compile(
        r"(?<![\w.])/(?:usr|home|root|tmp|var|opt|etc|srv|mnt|work|proc|dev|lib|run|data|models)(?:/[^\s'\":,;)]*)?"
    )

    def __init__(self, prefixes: list[str]) -> None:
        self.prefixes = sorted({p.rstrip("/") for p in prefixes if len(p.rstrip("/")) > 1}, key=len, reverse=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> Redactor:
        here = Path(__file__).resolve().parents[2]  # the source tree or site-packages holding service/
        places = [str(settings.state_dir), sys.prefix, sys.base_prefix, os.getcwd(), tempfile.gettempdir()]
        return cls([*places, str(Path.home()), str(here), *(str(m.weights) for m in settings.models if m.weights)])

    def __call__(self, message: str) -> str:
        for prefix in self.prefixes:
            if prefix in message:
                message = message.replace(prefix, "<server path>")
        message = self._OBJECT.sub("<object>", message)
        message = self._ADDRESS.sub("<address>", message)
        return self._PATH.sub("<server path>", message)


STATUS_DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: a parameter or the body is malformed (the detail says which)",
    401: "Authentication required: no `Authorization: Bearer <key>` header",
    403: "Forbidden: the API key is not valid",
    404: "Unknown model, detector, version or job",
    408: "The request body did not arrive in time",
    409: "Conflict: the job already ended",
    413: "Payload too large: body, image count or image pixels over the limits",
    415: "Unsupported media type",
    422: "Invalid name, parameter, image or detector state (the detail says which)",
    429: "Batch queue or fit-job queue full, or too many failed authentications from this address: retry after "
    "`Retry-After` s",
    431: "Request header fields too large or too many",
    500: "Internal server error (the body names neither the exception nor its message)",
    503: "Not ready: warming up, start-up failed or shutting down (`Retry-After`)",
    504: "The request was not processed before its deadline",
    507: "The state volume is full: nothing was changed",
}


PROTOCOL_V2_PREFIX = "/v2"
"""Paths of the Open Inference Protocol (:mod:`service.api.routes.v2`): their errors are its ``{"error": ...}``."""


def error_response(
    status: int, title: str, detail: str, request: Request, request_id: str | None, headers: dict[str, str]
) -> JSONResponse:
    """The error body chosen by path, the status always from the table: under ``/v2`` the Open Inference
    Protocol's ``{"error": detail}`` (``application/json``; the protocol answers invalid input with 400, so the
    table's 422 is 400 there), elsewhere :func:`problem_response`."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path == PROTOCOL_V2_PREFIX or path.startswith(PROTOCOL_V2_PREFIX + "/"):
        return JSONResponse({"error": detail}, status_code=400 if status == 422 else status, headers=headers)
    return problem_response(status, title, detail, request.url.path, request_id, headers)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each status answers a :class:`~service.api.schemas.Problem` body as
    ``application/problem+json`` (500 is added to every route)."""
    return {
        status: {
            "description": STATUS_DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in sorted({*statuses, 500})
    }


def problem_response(
    status: int,
    title: str,
    detail: str,
    instance: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A problem+json response: ``{"type", "title", "status", "detail", "instance", "request_id"}``."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


NAME_PARAMETERS = {"model": "model", "name": "detector"}
"""Path parameters that are names: a pattern mismatch is explained in words, not as the regular expression."""


def _detail(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            if len(loc) == 2 and loc[0] == "path" and loc[1] in NAME_PARAMETERS:
                try:
                    check_name(NAME_PARAMETERS[str(loc[1])], str(err.get("input", "")))
                except errors.InvalidNameError as invalid:
                    parts.append(str(invalid))
                    continue
            parts.append(f"{'.'.join(str(p) for p in loc)}: {err.get('msg')}")
        return "; ".join(parts) or "invalid request"
    return str(getattr(exc, "detail", None) or exc) or type(exc).__name__


def _headers(exc: Exception) -> dict[str, str]:
    headers = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(float(retry_after) + 0.499)))
    return headers


def _handler(redact: Redactor, status: int | None, fixed_title: str | None = None, outermost: bool = False) -> Handler:
    """``status`` ``None``: the exception's own ``status_code`` (Starlette's HTTP errors) or 500. ``outermost``: the
    handler of unexpected exceptions, which Starlette runs outside every middleware, so it adds the request id
    and server headers itself."""

    async def handle(request: Request, exc: Exception) -> Response:
        code = status if status is not None else int(getattr(exc, "status_code", 500))
        title = fixed_title or getattr(exc, "title", None) or type(exc).__name__
        headers = _headers(exc)
        if status is None and isinstance(exc, StarletteHTTPException):
            title = {404: "Not found", 405: "Method not allowed"}.get(code, "HTTP error")
            if code == 405:  # Starlette names the methods of the first matching route only
                headers["Allow"] = ", ".join(allowed_methods(request))
        unexpected = code >= 500 and status is None
        if unexpected:
            logger.error("unhandled error", exc_info=exc)
            title = "Internal server error"  # neither the exception's type nor its message leave the server
        if isinstance(exc, ClientDisconnect):
            logger.info("client disconnected before its request body was read", extra={"path": request.url.path})
        request_id = request_id_var.get() or getattr(request.state, "request_id", None)
        if outermost:
            headers["Server"] = "ood-serve"
            if request_id:
                headers["X-Request-ID"] = request_id
        if unexpected or code in CLOSES_CONNECTION:
            headers["Connection"] = "close"
        return error_response(
            code,
            str(title),
            "internal error" if unexpected else redact(_detail(exc)),
            request,
            request_id,
            headers,
        )

    return handle


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at this request's path."""
    path = request.url.path
    methods: set[str] = set()
    for route in request.app.router.routes:
        pattern, served = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if pattern is not None and served and pattern.match(path):
            methods.update(served)
    return sorted(methods)


def install_handlers(app: FastAPI, redact: Redactor) -> None:
    """Register the table's handlers, Starlette's HTTP errors (404/405 of unknown routes) and the catch-all."""
    for exc_type, (status, title) in status_table().items():
        app.add_exception_handler(exc_type, _handler(redact, status, title))
    app.add_exception_handler(StarletteHTTPException, _handler(redact, None))
    app.add_exception_handler(Exception, _handler(redact, None, outermost=True))
