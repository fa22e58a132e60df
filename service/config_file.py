"""The YAML / JSON config file of ``ood-serve`` (``--config`` or ``OOD_CONFIG``) read into a mapping; a file that
cannot be read or parsed is one :class:`ConfigFileError` line naming the file (and the line and column)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml


class ConfigFileError(ValueError):
    """A config file that cannot be read or parsed; the message is one line naming the file (and the place)."""


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a ``.yaml`` / ``.yml`` / ``.json`` config file into a dict (:class:`ConfigFileError` otherwise)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(f"cannot read config file {path}: {reason}") from exc
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"config file {path} is not valid JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigFileError(f"config file {path} is not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping at the top level")
    return data
