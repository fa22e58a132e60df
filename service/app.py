"""The app factory and lifespan: settings, logging, the error table, middleware, routes, schema and docs pages.

``uvicorn --factory service.app:create_app`` works too; settings are read when the app is created.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import problems
from service.api.auth import ApiKeys, FailureLimiter
from service.api.deps import ApiServices
from service.api.docs import install_docs, install_schema
from service.api.middleware import RequestContextMiddleware
from service.api.routes import console, detectors, drift, fit, health, jobs, models, score, segment, v2, versions
from service.api.scoring_lane import ScoringLane
from service.context import ServiceContext
from service.logs import configure_logging
from service.settings import Settings, load_settings

OPENAPI_URL = "/openapi.json"


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
        openapi_url=None if hide_schema else OPENAPI_URL,
        docs_url=None,  # served by service.api.docs, with no CDN
        redoc_url=None,
    )
    context = ServiceContext(settings)
    context.metrics.configure_drift(settings.drift_window, settings.drift_alpha, settings.drift_refresh_s)
    app.state.context = context
    app.state.jobs = context.jobs
    app.state.services = ApiServices(
        settings=settings,
        catalog=context.catalog,
        states=context.states,
        metrics=context.metrics,
        keys=ApiKeys.from_settings(settings),
        auth_failures=FailureLimiter(settings.auth_failures_per_minute),
    )
    redactor = problems.Redactor.for_settings(settings)
    context.jobs.redact = redactor  # a job's error never names a server path
    problems.install_handlers(app, redactor)
    # inside the request context (added first = inner): the hot scoring routes skip FastAPI's router
    app.add_middleware(ScoringLane, fastapi_app=app, routes=[*score.router.routes, *segment.router.routes])
    app.add_middleware(
        RequestContextMiddleware,
        metrics=context.metrics,
        max_body_bytes=settings.max_body_bytes,
        max_state_bytes=settings.max_state_bytes,
        body_grace_s=settings.body_grace_s,
        body_min_rate=settings.body_min_rate_kib_s * 1024,
        max_fit_bytes=settings.max_fit_upload_bytes,
    )
    for module in (health, models, detectors, versions, score, segment, fit, jobs, v2, drift, console):
        app.include_router(module.router)
    install_schema(app, settings.max_images_per_request, settings.max_fit_images)
    if not hide_schema:
        install_docs(app, OPENAPI_URL)
    return app
