"""The served models by name, and whether the service is ready to use them (the request path's lookup)."""

from __future__ import annotations

from collections.abc import Iterator

from service.engine.served_model import ServedModel
from service.errors import ModelNotFoundError, NotReadyError
from service.settings import check_name


class ModelCatalog:
    """Filled by start-up (:class:`service.context.ServiceContext`); read by every request."""

    def __init__(self) -> None:
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.failure: str | None = None
        """Why start-up failed (``None`` while it is running or after it succeeded)."""

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self.models.values()))

    def require_ready(self) -> None:
        """Raise :class:`NotReadyError` (503) until start-up is done."""
        if not self.ready:
            raise NotReadyError(self.failure or "the service is warming up")

    def get(self, name: str) -> ServedModel:
        """The ready model ``name``: 503 while warming up, 422 for an invalid name, 404 for an unknown one."""
        self.require_ready()
        check_name("model", name)
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(f"no model {name!r}; served: {', '.join(sorted(self.models)) or '(none)'}")
        return model
