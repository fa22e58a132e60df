"""API keys: ``Authorization: Bearer <key>``, compared in constant time, required for every write; failed
attempts rate-limited per client address (:class:`FailureLimiter`).

Keys come from ``OOD_API_KEYS`` (comma-separated) and/or ``OOD_API_KEYS_FILE`` (one per line). With none
configured a random key is generated at start and logged once, so writes are never open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict, deque

from service.errors import AuthenticationRequiredError, ForbiddenError, TooManyFailedAuthenticationsError
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


class FailureLimiter:
    """Failed authentications per client address in a sliding window of one minute.

    Past ``per_minute`` failures (wrong keys; a request with no key guesses nothing and is not counted, so keyless
    clients behind one address cannot lock out a client with the key) an address gets
    :class:`TooManyFailedAuthenticationsError` (429 with ``Retry-After``: until its oldest counted failure leaves
    the window), whatever key it sends, so keys cannot be guessed at speed. At most ``max_clients`` addresses are tracked (least recently failed dropped first).
    Used from the event loop only (no lock).
    """

    def __init__(self, per_minute: int, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is not None:
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if not times:
                del self._failures[client]
                return None
        return times

    def check(self, client: str) -> None:
        if not self._failures:
            return
        now = time.monotonic()
        times = self._recent(client, now)
        if times is not None and len(times) >= self.per_minute:
            wait = self.window_s - (now - times[0])
            raise TooManyFailedAuthenticationsError(
                f"{len(times)} failed authentications from this address in the last {self.window_s:.0f} s; "
                f"retry after {wait:.0f} s",
                retry_after_s=wait,
            )

    def failed(self, client: str) -> None:
        now = time.monotonic()
        times = self._recent(client, now)
        if times is None:
            times = self._failures[client] = deque(maxlen=self.per_minute)
        times.append(now)
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
