"""The app factory: settings, the ONE exception -> HTTP status table, middleware, routes and lifespan.

``uvicorn --factory service.app:create_app`` works too; settings are read when the app is created.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ood_core.api import InvalidStateError
from service import errors
from service.batcher import BatcherClosedError, QueueFullError, RequestTimeoutError
from service.context import ServiceContext
from service.logs import configure_logging, request_id_var
from service.middleware import RequestContextMiddleware
from service.routes import detectors, fit, health, models, score, segment
from service.settings import Settings, load_settings

logger = logging.getLogger("service.app")

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _status_table() -> dict[type[Exception], tuple[int, str | None]]:
    """Every library and service exception the routes may raise -> (HTTP status, problem title; ``None``: the
    exception's own ``title``)."""
    return {
        errors.BadRequestError: (400, None),
        errors.AuthenticationRequiredError: (401, None),
        errors.ForbiddenError: (403, None),
        errors.ModelNotFoundError: (404, None),
        errors.DetectorNotFoundError: (404, None),
        errors.PayloadTooLargeError: (413, None),
        errors.TooManyImagesError: (413, None),
        errors.ImageTooLargeError: (413, None),
        errors.UnsupportedMediaTypeError: (415, None),
        errors.InvalidNameError: (422, None),
        errors.ImageDecodeError: (422, None),
        errors.WrongTaskError: (422, None),
        errors.UnservableDetectorError: (422, None),
        InvalidStateError: (422, "Invalid detector state"),
        RequestValidationError: (422, "Invalid request parameters"),
        QueueFullError: (429, "Too many requests: batch queue full"),
        errors.NotReadyError: (503, None),
        BatcherClosedError: (503, "Service shutting down"),
        RequestTimeoutError: (504, "Request timed out in the batch queue"),
    }


def _detail(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return "; ".join(parts) or "invalid request"
    return str(getattr(exc, "detail", None) or exc) or type(exc).__name__


def _headers(exc: Exception) -> dict[str, str]:
    headers = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(float(retry_after) + 0.499)))
    return headers


def _handler(status: int | None, fixed_title: str | None = None, outermost: bool = False) -> Handler:
    """``status`` ``None``: the exception's own ``status_code`` (Starlette's HTTP errors) or 500. ``outermost``: the
    handler of unexpected exceptions, which Starlette runs outside every middleware, so it adds the request id
    header itself."""

    async def handle(request: Request, exc: Exception) -> Response:
        code = status if status is not None else int(getattr(exc, "status_code", 500))
        title = fixed_title or getattr(exc, "title", None) or type(exc).__name__
        if status is None and isinstance(exc, StarletteHTTPException):
            title = {404: "Not found", 405: "Method not allowed"}.get(code, "HTTP error")
        unexpected = code >= 500 and status is None
        if unexpected:
            logger.error("unhandled error", exc_info=exc)
            title = "Internal server error"  # neither the exception's type nor its message leave the server
        request_id = request_id_var.get() or getattr(request.state, "request_id", None)
        headers = _headers(exc)
        if outermost and request_id:
            headers["X-Request-ID"] = request_id
        return errors.problem_response(
            code,
            str(title),
            "internal error" if unexpected else _detail(exc),
            request.url.path,
            request_id,
            headers,
        )

    return handle


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    context: ServiceContext = app.state.context
    await context.start()
    try:
        yield
    finally:
        await context.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; with no ``settings`` they are read from the environment / ``OOD_CONFIG`` now."""
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.log_level, settings.log_json)
    hide_schema = settings.require_auth_for_read  # reads need a key: the schema and docs pages are not served
    app = FastAPI(
        title="ood-serve",
        summary="Out-of-distribution scoring with dynamic batching",
        version="0.1.0",
        lifespan=_lifespan,
        openapi_url=None if hide_schema else "/openapi.json",
    )
    context = ServiceContext(settings)
    app.state.context = context
    for exc_type, (status, title) in _status_table().items():
        app.add_exception_handler(exc_type, _handler(status, title))
    app.add_exception_handler(StarletteHTTPException, _handler(None))
    app.add_exception_handler(Exception, _handler(None, outermost=True))
    app.add_middleware(
        RequestContextMiddleware,
        metrics=context.metrics,
        max_body_bytes=settings.max_body_bytes,
        max_state_bytes=settings.max_state_bytes,
    )
    for module in (health, models, detectors, score, segment, fit):
        app.include_router(module.router)
    return app
