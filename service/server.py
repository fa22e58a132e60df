"""The uvicorn server of an app: its HTTP protocol with the connection defences
(:mod:`service.api.http_protocol`), keep-alive, no ``server: uvicorn`` header, JSON logs, graceful shutdown.

:func:`uvicorn_config` is what ``ood-serve`` runs and what the tests' real-HTTP servers run.

``OOD_WORKERS=N`` (:func:`run_workers`): uvicorn's process supervisor with N worker processes on one listening
socket, each with its own app, models and batchers (:class:`WorkerConfig` builds them in the worker; the
supervisor only binds the socket, restarts a worker that dies and stops them all on SIGTERM/SIGINT). A worker
accepts connections only once its models are ready. The workers
share the state directory: a state uploaded to one is loaded by the others at their next sync
(``OOD_STATE_SYNC_S``). Before the workers start, the supervisor fits the demo's states once if the directory has
none (:func:`service.context.prepare_states`), so N workers do not fit them N times. Each worker gets
``cores / N`` intra-op threads unless ``OMP_NUM_THREADS`` is set. A worker whose start-up fails exits with
uvicorn's start-up-failure status, which stops the supervisor.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.api.deps import ApiServices
from service.api.http_protocol import ConnectionLimits, guarded_protocol
from service.logs import uvicorn_log_config
from service.settings import Settings

logger = logging.getLogger("service.server")
WORKER_HEALTHCHECK_S = 60
"""Seconds a worker may take to answer the supervisor's health check before it is taken for hung and replaced."""
WORKER_STARTUP_S = 3600.0
"""Longest a worker's start-up (models, states, warm-up, compilation) may take before the worker gives up."""
PONG_GRACE_S = 0.3
"""A worker whose start-up failed waits this long before it exits, so an outstanding health check is answered
(otherwise the supervisor noticed the dead worker only after :data:`WORKER_HEALTHCHECK_S`, in about half the runs
of ``tests/service/test_workers.py``'s start-up failure)."""


def _protocol(app: FastAPI, settings: Settings) -> type[Any]:
    services: ApiServices = app.state.services
    limits = ConnectionLimits(
        max_connections=settings.max_connections,
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
    )
    return guarded_protocol(limits, services.metrics.rejected_connection)


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "timeout_keep_alive": settings.keep_alive_s,
        "server_header": False,  # the middleware says `server: ood-serve`
        "log_config": uvicorn_log_config(settings.log_level, settings.log_json),
        "access_log": False,  # the app logs one JSON line per request, with its request id
        "timeout_graceful_shutdown": 30,
        "lifespan": "on",
    }


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """``uvicorn.Config`` for ``app`` (``overrides``: host, port, log_config, ... as uvicorn takes them)."""
    options: dict[str, Any] = {"http": _protocol(app, settings), **_options(settings)}
    options.update(overrides)
    return uvicorn.Config(app, **options)


class WorkerConfig(uvicorn.Config):
    """A ``uvicorn.Config`` that the supervisor sends (pickled) to each worker process, which builds its own app
    from the settings when uvicorn loads the config there."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.settings = settings
        # the supervisor pings each worker (a thread there answers): a worker importing torch and building its
        # models on a loaded machine holds the GIL for seconds, and uvicorn's default 5 s would kill it
        options = {**_options(settings), "timeout_worker_healthcheck": WORKER_HEALTHCHECK_S, **overrides}
        super().__init__("service.app:create_app", **options)

    def load(self) -> None:
        from service.app import create_app

        app = create_app(self.settings)
        _serve_when_ready(app)
        self.app, self.http = app, _protocol(app, self.settings)
        super().load()


def _serve_when_ready(app: FastAPI) -> None:
    """A worker's lifespan start-up ends only when its models are ready, so uvicorn accepts connections on the
    shared socket only then: the ready workers take all the traffic meanwhile, and no client is answered "warming
    up" by one worker after another said ready (a single process serves ``/healthz`` at once instead). A worker
    whose start-up fails exits with :data:`uvicorn.config.STARTUP_FAILURE`."""
    original = app.router.lifespan_context

    @asynccontextmanager
    async def until_ready(app: FastAPI) -> AsyncIterator[Any]:
        async with original(app) as state:
            try:
                await app.state.context.wait_ready(WORKER_STARTUP_S)
            except Exception as exc:  # the models did not build: exit with uvicorn's start-up-failure status,
                # which stops the supervisor (restarting would fail the same way)
                logger.error("worker start-up failed", extra={"reason": str(exc)})
                sys.stderr.flush()
                # the supervisor's health-check ping may be waiting for an answer the busy start-up kept from its
                # pong thread; a worker that died with it unanswered would be noticed only after the check's whole
                # timeout (its pipe never reports EOF): let the pong thread answer first
                time.sleep(PONG_GRACE_S)
                os._exit(STARTUP_FAILURE)
            yield state

    app.router.lifespan_context = until_ready


def run_workers(settings: Settings, host: str, port: int) -> int:
    """Serve with ``settings.workers`` worker processes until SIGTERM/SIGINT; the exit status (0, or
    :data:`uvicorn.config.STARTUP_FAILURE` when a worker could not start)."""
    from service.api.auth import configured_keys
    from service.context import prepare_states
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    if not configured_keys(settings):  # one generated key for all workers (each would draw its own)
        generated = secrets.token_urlsafe(32)
        logger.warning(
            "no API key configured (OOD_API_KEYS / OOD_API_KEYS_FILE); generated for these workers: %s",
            generated,
            extra={"api_key": generated},
        )
        settings = settings.model_copy(update={"api_keys": generated})
    if "OMP_NUM_THREADS" not in os.environ:  # N workers x all cores of threads would oversubscribe the CPU
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.workers))
    prepare_states(settings)
    config = WorkerConfig(settings, host=host, port=port, workers=settings.workers)
    config.configure_logging()
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    return STARTUP_FAILURE if failed else 0
