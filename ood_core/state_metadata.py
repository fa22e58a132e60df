"""The header metadata of a saved detector state: its keys (:func:`state_metadata`, written by
:func:`~ood_core.state.save_detector`), their validation into a :class:`StateInfo` (:func:`state_info`) and the
tensor digest check (:func:`check_digest`).

Metadata keys (all strings): ``format``, ``format_version``, ``class``, ``hparams`` (JSON of the constructor
arguments, sorted keys), ``feature_dim`` and ``num_classes`` (JSON int or null), ``input_kind``,
``library_version``, ``tensor_sha256`` (:func:`~ood_core.state_io.tensor_digest` of all the tensors) and,
optionally, ``calibration`` (JSON). Format versions: ``"2"`` (written now) requires ``tensor_sha256``; ``"1"``
files, written before the digest existed, still load without one (their digest is checked if present).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor

import ood_core
from ood_core.api import Detector
from ood_core.errors import InvalidStateError
from ood_core.state_format import excerpt
from ood_core.state_io import tensor_digest
from ood_core.state_write import canonical_json

FORMAT = "ood-serve/detector-state"
FORMAT_VERSION = "2"
#: versions :func:`~ood_core.state.load_detector` reads; ``"1"`` predates ``tensor_sha256``
READABLE_VERSIONS = ("1", "2")
DIGEST_KEY = "tensor_sha256"
#: longest accepted ``library_version``
MAX_VERSION_CHARS = 64
#: accepted ``library_version`` values (PEP 440-like: release numbers, optional suffix such as ``.dev1``);
#: each repetition consumes one character, so matching is linear (no nested quantifiers to backtrack)
_VERSION = re.compile(r"\d+(\.\d+)*([0-9A-Za-z]|[.+-][0-9A-Za-z])*")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StateInfo:
    """The header of a saved detector state, validated but without building the detector."""

    cls: str
    hparams: dict[str, Any]
    feature_dim: int | None
    num_classes: int | None
    input_kind: str
    library_version: str
    calibration: dict[str, Any] | None


def state_metadata(detector: Detector, tensors: dict[str, Tensor], calibration: str | None) -> dict[str, str]:
    """The metadata :func:`~ood_core.state.save_detector` writes for ``detector`` (``tensors``: all the file's
    tensors, calibration included; ``calibration``: its metadata JSON). ``ValueError`` when a constructor
    argument cannot be stored as JSON."""
    try:
        hparams_json = canonical_json(detector.hparams())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hyperparameters of {type(detector).__name__} are not JSON-serializable: {exc}") from exc
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": type(detector).__name__,
        "hparams": hparams_json,
        "feature_dim": json.dumps(detector.feature_dim),
        "num_classes": json.dumps(detector.num_classes),
        "input_kind": detector.input_kind,
        "library_version": ood_core.__version__,
    }
    if calibration is not None:
        metadata["calibration"] = calibration
    metadata[DIGEST_KEY] = tensor_digest(tensors)
    return metadata


def _reject_constant(name: str) -> Any:
    raise InvalidStateError(f"non-finite number {name} in the state metadata")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999, which Python's json reads as inf
        raise InvalidStateError(f"non-finite number {text[:40]} in the state metadata")
    return value


def json_field(meta: dict[str, str], key: str) -> Any:
    """Strict JSON of a metadata field: ``NaN``, ``Infinity`` and overflowing numbers such as ``1e999`` (all of
    which Python's json accepts) are rejected, however deeply they are nested."""
    if key not in meta:
        raise InvalidStateError(f"state metadata lacks '{key}'")
    try:
        return json.loads(meta[key], parse_constant=_reject_constant, parse_float=_finite_float)
    except InvalidStateError:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as are over-long integers
        raise InvalidStateError(f"state metadata '{key}' is not valid JSON") from None


def state_info(meta: dict[str, str]) -> StateInfo:
    """The validated :class:`StateInfo` of a state's metadata (:class:`InvalidStateError` naming what is wrong)."""
    if meta.get("format") != FORMAT:
        raise InvalidStateError(f"not an ood-serve detector state (format={excerpt(meta.get('format'))})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise InvalidStateError(f"unsupported state format version {excerpt(meta.get('format_version'))}")
    hparams = json_field(meta, "hparams")
    if not isinstance(hparams, dict):
        raise InvalidStateError("state 'hparams' must be a JSON object")
    dims = {}
    for key in ("feature_dim", "num_classes"):
        val = json_field(meta, key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
            raise InvalidStateError(f"state '{key}' must be a positive integer or null, got {excerpt(val)}")
        dims[key] = val
    version = meta.get("library_version")
    if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS or _VERSION.fullmatch(version) is None:
        raise InvalidStateError(f"state 'library_version' must be a version string, got {excerpt(version)}")
    calib = json_field(meta, "calibration") if "calibration" in meta else None
    return StateInfo(
        cls=str(meta.get("class")),
        hparams=hparams,
        feature_dim=dims["feature_dim"],
        num_classes=dims["num_classes"],
        input_kind=str(meta.get("input_kind")),
        library_version=version,
        calibration=calib,
    )


def check_digest(meta: dict[str, str], tensors: dict[str, Tensor]) -> None:
    """``tensor_sha256`` matches the tensors; required from format version 2 on."""
    want = meta.get(DIGEST_KEY)
    if want is None:
        if meta.get("format_version") == "1":
            return
        raise InvalidStateError(f"state metadata lacks '{DIGEST_KEY}' (required by format version {FORMAT_VERSION})")
    if _HEX_DIGEST.fullmatch(want) is None:
        raise InvalidStateError(f"state '{DIGEST_KEY}' must be 64 lowercase hexadecimal digits")
    if tensor_digest(tensors) != want:
        raise InvalidStateError(f"tensor digest mismatch: the file is corrupted ('{DIGEST_KEY}' does not match)")
