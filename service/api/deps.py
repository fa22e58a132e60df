"""Route dependencies as ``Annotated`` aliases (``async def``: FastAPI runs plain ``def`` dependencies in the
thread pool, one thread hop each).

Routes get :class:`ApiServices`, the request path's view of the service (model lookups, the state manager,
metrics, limits, keys), never the object that owns start-up (:class:`service.context.ServiceContext`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import ApiKeys, FailureLimiter
from service.engine.catalog import ModelCatalog
from service.engine.served_model import ServedModel
from service.errors import ForbiddenError
from service.metrics import ServiceMetrics
from service.settings import NAME_MAX_LENGTH, NAME_REGEX, Settings, check_name
from service.states.manager import StateManager


@dataclass(frozen=True)
class ApiServices:
    """What a route may use (``app.state.services``)."""

    settings: Settings
    catalog: ModelCatalog
    states: StateManager
    metrics: ServiceMetrics
    keys: ApiKeys
    auth_failures: FailureLimiter


async def get_services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


Services = Annotated[ApiServices, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="an API key of OOD_API_KEYS / OOD_API_KEYS_FILE")
"""Only declares the security scheme in ``/openapi.json``; the check reads the header itself (so a wrong scheme
gets its own message)."""


async def require_write(
    services: Services, request: Request, _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Writes always need a valid API key (401 without, 403 with a wrong one, 429 after too many failures)."""
    _check_key(services, request)


async def require_read(services: Services, request: Request) -> None:
    """Reads need a key only when ``OOD_REQUIRE_AUTH_FOR_READ=true`` (then no schema is served). The header is
    read from the request, not declared as a parameter: nothing about it can fail validation."""
    if services.settings.require_auth_for_read:
        _check_key(services, request)


def _check_key(services: ApiServices, request: Request) -> None:
    """The key check, rate-limited per client address: past the limit of failures even a good key waits."""
    client = request.client.host if request.client is not None else "unknown"
    services.auth_failures.check(client)
    try:
        services.keys.check(request.headers.get("authorization"))
    except ForbiddenError:  # a wrong key: a guess
        services.auth_failures.failed(client)
        raise


WriteAccess = Annotated[None, Depends(require_write)]
ReadAccess = Annotated[None, Depends(require_read)]


NAME_DOC = "letters, digits, '_', '.', '-'; starting with a letter or digit; no '..'"


NAME_SCHEMA = {"pattern": NAME_REGEX, "minLength": 1, "maxLength": NAME_MAX_LENGTH}
"""The name rule in the schema; at run time :func:`~service.settings.check_name` enforces it, with a message in
words (pydantic's pattern check would cost every request and quote the regular expression)."""
ModelName = Annotated[str, Path(description=f"model name ({NAME_DOC})", json_schema_extra=NAME_SCHEMA)]


async def get_model(services: Services, model: ModelName) -> ServedModel:
    return services.catalog.get(model)


Model = Annotated[ServedModel, Depends(get_model)]


async def get_readable_model(request: Request, model: ModelName) -> ServedModel:
    """:data:`ReadAccess` and :data:`Model` in one dependency, for the scoring routes (each dependency costs
    every request some microseconds of FastAPI's resolution)."""
    services: ApiServices = request.app.state.services
    if services.settings.require_auth_for_read:
        _check_key(services, request)
    return services.catalog.get(model)


ReadableModel = Annotated[ServedModel, Depends(get_readable_model)]


async def get_detector_name(
    name: Annotated[str, Path(description=f"detector name ({NAME_DOC})", json_schema_extra=NAME_SCHEMA)],
) -> str:
    return check_name("detector", name)


DetectorName = Annotated[str, Depends(get_detector_name)]


Detectors = Annotated[str | None, Query(description="comma-separated detector names (default: all)")]
Threshold = Annotated[float | None, Query(description="absolute threshold for every detector (overrides tpr)")]
TargetTPR = Annotated[float | None, Query(gt=0.0, le=1.0, description="ID true-positive rate for the threshold")]


@dataclass(frozen=True)
class ScoringQuery:
    """The query parameters of ``/score`` and ``/segment`` (plain route parameters, not a dependency: cheaper)."""

    detectors: list[str] | None
    threshold: float | None
    tpr: float | None

    @classmethod
    def parse(cls, detectors: str | None, threshold: float | None, tpr: float | None) -> ScoringQuery:
        """``?detectors=a,b`` -> ``["a", "b"]`` (``None``: every active detector). A name no detector can have is
        just not found (404): these names are only looked up, never used as paths."""
        names = None if detectors is None else [d.strip() for d in detectors.split(",") if d.strip()]
        return cls(names or None, threshold, tpr)
