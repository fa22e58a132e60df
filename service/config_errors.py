"""Configuration mistakes as one line each, for ``ood-serve`` to print before it exits (never a traceback, never
a server that answers 503 to everything).

* :func:`describe_config_error`: a :class:`pydantic.ValidationError` of :class:`~service.settings.Settings` (or a
  :class:`~service.settings.ConfigFileError`) as ``key: what is wrong (got ...)`` items; a misspelt key is named
  with its closest known key (``difflib``), nested keys with their place (``models[0].nodes.logits``), top-level
  ones with their environment variable.
* :func:`check_paths`: the files and folders the settings name exist (a model's ``weights``, the keys file, the
  fit data root), each missing one named by its config key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from service.settings import Settings

ENV_PREFIX = "OOD_"
MAX_INPUT_CHARS = 60


class ConfigPathError(ValueError):
    """A file or folder named by the settings is missing or unreadable (one line, naming its key)."""


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``list[X]``, ``X | None``, ... (``None`` for plain values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _place(loc: tuple[int | str, ...]) -> tuple[str, type[BaseModel] | None, bool]:
    """``('models', 0, 'nodes', 'logits')`` -> ``("models[0].nodes.logits", <model holding the last key>,
    top-level)``; union branch names and other parts that are no key are dropped."""
    model: type[BaseModel] | None = Settings
    holder: type[BaseModel] | None = Settings
    text, keys = "", 0
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        if model is None or part not in model.model_fields:
            if model is not None and part == loc[-1]:  # the unknown key itself (extra_forbidden)
                text += f".{part}" if text else part
                holder, keys = model, keys + 1
            break
        text += f".{part}" if text else part
        holder, keys = model, keys + 1
        model = _inner_model(model.model_fields[part].annotation)
    return text, holder, keys == 1


def _shown(value: Any) -> str:
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = repr(value)
        return text if len(text) <= MAX_INPUT_CHARS else text[: MAX_INPUT_CHARS - 3] + "..."
    return ""


def _message(error: ErrorDetails) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _items(exc: ValidationError) -> list[str]:
    grouped: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        place, holder, top = _place(loc)
        if error["type"] == "extra_forbidden":
            key = str(loc[-1])
            known = list(holder.model_fields) if holder is not None else []
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
            grouped.setdefault(place, []).append(f"unknown {'setting' if top else 'key'}{hint}")
            continue
        if error["type"] == "missing":
            grouped.setdefault(place, []).append("required, missing")
            continue
        shown = _shown(error.get("input"))
        grouped.setdefault(place, []).append(_message(error) + (f" (got {shown})" if shown else ""))
    items = []
    for place, messages in grouped.items():
        name = place.split("[", 1)[0].split(".", 1)[0]
        label = place or "settings"
        if place == name and name in Settings.model_fields:  # a top-level setting: also say its variable
            label = f"{place} ({ENV_PREFIX}{name.upper()})"
        items.append(f"{label}: {' or '.join(dict.fromkeys(messages))}")
    return items


def describe_config_error(exc: BaseException) -> str:
    """One line saying what is wrong with the configuration."""
    if isinstance(exc, ValidationError):
        return "; ".join(_items(exc))
    return " ".join(str(exc).split())  # OSError / ValueError texts, on one line


def _missing(path: Path, kind: str) -> str | None:
    if kind == "file" and not path.is_file():
        return f"no such file: {path}" if not path.exists() else f"not a file: {path}"
    if kind == "folder" and not path.is_dir():
        return f"no such folder: {path}" if not path.exists() else f"not a folder: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    return None


def check_paths(settings: Settings) -> None:
    """Raise :class:`ConfigPathError` naming every configured path that is missing or unreadable."""
    problems: list[str] = []
    for index, model in enumerate(settings.models):
        if model.weights is not None and (why := _missing(model.weights, "file")):
            problems.append(f"models[{index}].weights (model {model.name!r}): {why}")
    if settings.api_keys_file is not None and (why := _missing(settings.api_keys_file, "file")):
        problems.append(f"api_keys_file ({ENV_PREFIX}API_KEYS_FILE): {why}")
    if settings.fit_data_root is not None and (why := _missing(settings.fit_data_root, "folder")):
        problems.append(f"fit_data_root ({ENV_PREFIX}FIT_DATA_ROOT): {why}")
    if problems:
        raise ConfigPathError("; ".join(problems))
