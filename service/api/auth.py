"""API keys: ``Authorization: Bearer <key>``, compared in constant time, required for every write.

Keys come from ``OOD_API_KEYS`` (comma-separated) and/or ``OOD_API_KEYS_FILE`` (one per line). With none
configured a random key is generated at start and logged once, so writes are never open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from service.errors import AuthenticationRequiredError, ForbiddenError
from service.settings import Settings

logger = logging.getLogger("service.auth")


def configured_keys(settings: Settings) -> list[str]:
    keys = [k.strip() for k in (settings.api_keys or "").split(",")]
    if settings.api_keys_file is not None:
        try:
            text = settings.api_keys_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read OOD_API_KEYS_FILE {settings.api_keys_file}: {exc}") from exc
        for line in text.splitlines():
            keys.append(line.split("#", 1)[0].strip())
    return [k for k in keys if k]


def _digest(key: str) -> bytes:
    """SHA-256 of the key: every comparison is then between equal-length values, so its time reveals neither
    the keys' contents nor their lengths."""
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The accepted keys and the check used by the auth dependencies."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        keys = configured_keys(settings)
        if not keys:
            generated = secrets.token_urlsafe(32)
            logger.warning(
                "no API key configured (OOD_API_KEYS / OOD_API_KEYS_FILE); generated for this process: %s",
                generated,
                extra={"api_key": generated},
            )
            keys = [generated]
        return cls(keys)

    def matches(self, key: str) -> bool:
        """Constant-time comparison against every key (no early exit)."""
        candidate = _digest(key)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(candidate, known)
        return found

    def check(self, authorization: str | None) -> None:
        """Raise 401 without a Bearer key, 403 with a wrong one."""
        if not authorization:
            raise AuthenticationRequiredError()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationRequiredError("the Authorization header must be 'Bearer <key>'")
        if not self.matches(token.strip()):
            raise ForbiddenError("the API key is not valid")
