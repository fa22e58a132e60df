"""The uvicorn server of an app: its HTTP protocol with the connection defences
(:mod:`service.api.http_protocol`), keep-alive, no ``server: uvicorn`` header, JSON logs, graceful shutdown.

:func:`uvicorn_config` is what ``ood-serve`` runs and what the tests' real-HTTP servers run.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from fastapi import FastAPI

from service.api.deps import ApiServices
from service.api.http_protocol import ConnectionLimits, guarded_protocol
from service.logs import uvicorn_log_config
from service.settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """``uvicorn.Config`` for ``app`` (``overrides``: host, port, log_config, ... as uvicorn takes them)."""
    services: ApiServices = app.state.services
    limits = ConnectionLimits(
        max_connections=settings.max_connections,
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
    )
    options: dict[str, Any] = {
        "http": guarded_protocol(limits, services.metrics.rejected_connection),
        "timeout_keep_alive": settings.keep_alive_s,
        "server_header": False,  # the middleware says `server: ood-serve`
        "log_config": uvicorn_log_config(settings.log_level, settings.log_json),
        "access_log": False,  # the app logs one JSON line per request, with its request id
        "timeout_graceful_shutdown": 30,
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
