"""The service's exceptions, shared by every layer (no web import: the engine and the states raise them too).

Each carries its problem ``title`` and the ``detail`` message; the ONE exception -> HTTP status table and the
``application/problem+json`` body live in :mod:`service.api.problems`.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: the message is the problem's ``detail``; ``headers`` are added to the response."""

    title = "Service error"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class ModelNotFoundError(ServiceError):
    title = "Unknown model"


class DetectorNotFoundError(ServiceError):
    title = "Unknown detector"


class InvalidNameError(ServiceError):
    title = "Invalid name"


class BadRequestError(ServiceError):
    title = "Bad request"


class WrongTaskError(ServiceError):
    """The route does not apply to the model's task (e.g. ``/segment`` on a classifier): there is no such
    resource for that model (404)."""

    title = "Route not available for this model"


class UnsupportedMediaTypeError(ServiceError):
    title = "Unsupported media type"


class PayloadTooLargeError(ServiceError):
    title = "Payload too large"


class TooManyImagesError(ServiceError):
    title = "Too many images"


class ImageTooLargeError(ServiceError):
    title = "Image too large"


class ImageDecodeError(ServiceError):
    title = "Undecodable image"


class UnservableDetectorError(ServiceError):
    """A detector class the service cannot run for this model (input kind, task)."""

    title = "Detector cannot be served"


class InsufficientStorageError(ServiceError):
    """The state volume is full (ENOSPC / EDQUOT): nothing was changed, nothing left behind."""

    title = "Insufficient storage"


class TooManyFailedAuthenticationsError(ServiceError):
    """Too many requests with a missing or wrong API key from one client address."""

    title = "Too many failed authentications"

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class RequestTimeoutReadingBodyError(ServiceError):
    """The client did not send its body in time."""

    title = "Request timeout"


class HeadersTooLargeError(ServiceError):
    title = "Request header fields too large"


class ResponseTooLargeError(ServiceError):
    """The answer would exceed the response size budget (e.g. too many or too large segmentation maps)."""

    title = "Response too large"


class AuthenticationRequiredError(ServiceError):
    title = "Authentication required"

    def __init__(self, detail: str = "missing API key: send 'Authorization: Bearer <key>'") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(ServiceError):
    title = "Forbidden"


class NotReadyError(ServiceError):
    title = "Service not ready"

    def __init__(self, detail: str = "the service is warming up", retry_after_s: float = 1.0) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, round(retry_after_s)))})
