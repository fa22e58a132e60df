"""The scoring lane: ``POST /v1/models/{model}/score`` and ``/segment`` dispatched straight to their handlers.

FastAPI 0.165 routes a request through nested included routers (every included router matches the path against
each of its routes, saving and restoring its keys in the scope) and wraps it in its telemetry, body-limit,
async-exit-stack and exception-wrapping layers. On the demo at concurrency 64 that is about a quarter of the event
loop's time per request (in-process ASGI driver, 64 concurrent requests: 0.41-0.49 -> 0.27-0.39 ms of event-loop
CPU per request; ``docs/benchmark-serve.md``), spent before our code runs. This ASGI middleware sits inside
:class:`~service.api.middleware.RequestContextMiddleware` (request ids, body limits, request metrics and the access
log apply unchanged) and, for a ``POST`` whose path matches a lean scoring route, does what the router would:
sets ``route`` and ``path_params`` in the scope, calls the route's lean handler
(:meth:`~service.api.routes.score.LeanRoute.lean_handler`: the same dependencies, validation and endpoint) and
answers an exception through the app's own exception handlers (the one status table of
:mod:`service.api.problems`), so the answer is byte for byte what the full stack gives. Everything else, including
other methods on these paths, goes through FastAPI unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.routes.score import LeanRoute

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
ExceptionHandler = Callable[[Request, Exception], Coroutine[Any, Any, Response]]


class ScoringLane:
    """ASGI middleware: lean ``POST`` routes bypass FastAPI's router (see the module docstring)."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.lanes: list[tuple[LeanRoute, Handler]] = []
        for route in routes:
            if isinstance(route, LeanRoute) and route.methods == {"POST"}:
                handler = route.lean_handler()
                if handler is not None:
                    self.lanes.append((route, handler))

    def _select(self, scope: Scope) -> tuple[LeanRoute, Handler, dict[str, Any]] | None:
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        for route, handler in self.lanes:
            match = route.path_regex.match(path)
            if match is not None:
                params = {key: route.param_convertors[key].convert(value) for key, value in match.groupdict().items()}
                return route, handler, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        selected = self._select(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if selected is None:
            await self.app(scope, receive, send)
            return
        route, handler, params = selected
        scope["route"] = route
        scope["path_params"] = params
        scope["endpoint"] = route.endpoint
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except Exception as exc:
            exception_handler = self._handler_for(exc)
            if exception_handler is None:
                raise  # the app's catch-all (ServerErrorMiddleware): a 500 that names nothing
            response = await exception_handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ExceptionHandler | None:
        """The app's handler for ``exc`` by its class hierarchy, as Starlette's ``ExceptionMiddleware`` looks it up
        (the handler of ``Exception`` itself is the outermost catch-all, not this layer's)."""
        handlers = self.fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = handlers.get(cls)
            if handler is not None:
                return handler  # type: ignore[return-value]
        return None
