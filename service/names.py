"""Model and detector names: safe path components (:func:`check_name`), one rule for Python, pydantic and the JSON
Schema of ``/openapi.json`` (:data:`NAME_REGEX`)."""

from __future__ import annotations

import re

from service.errors import InvalidNameError

NAME_REGEX = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
"""Model and detector names: letters, digits, ``_ . -``, starting with a letter or digit, never two dots in a row
(no path traversal); 1-64 characters. Written without look-arounds, so the same pattern serves Python, pydantic
and the JSON Schema of ``/openapi.json``."""
NAME_PATTERN = re.compile(NAME_REGEX)
NAME_MAX_LENGTH = 64


def is_valid_name(name: str) -> bool:
    # fullmatch (not match): "$" alone would accept a final "\n"
    return len(name) <= NAME_MAX_LENGTH and bool(NAME_PATTERN.fullmatch(name)) and ".." not in name


def check_name(kind: str, name: str) -> str:
    """Raise :class:`~service.errors.InvalidNameError` unless ``name`` is a safe path component."""
    if not is_valid_name(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: 1-64 characters of letters, digits, '_', '.', '-', not starting with "
            "'.' and without '..'"
        )
    return name
