"""Save and load fitted detectors as one safetensors file.

Layout of the file:

* tensors: every buffer named in the detector's :attr:`~ood_core.api.Detector.state_spec` (the fitted
  state and constructor tensors such as ViM's ``w``/``b``), plus ``calibration.quantiles`` when a
  :class:`~ood_core.calibration.Calibration` is attached;
* header metadata (strings): ``format``, ``format_version``, ``class``, ``hparams`` (JSON of the
  constructor arguments), ``feature_dim`` and ``num_classes`` (JSON int or null), ``input_kind``,
  ``library_version``, ``tensor_sha256`` (:func:`~ood_core.state_io.tensor_digest` of all the tensors)
  and, optionally, ``calibration`` (JSON).

Format versions: ``"2"`` (written now) requires ``tensor_sha256``; ``"1"`` files, written before the digest
existed, still load without one (their digest is checked if present).

Nothing is unpickled: safetensors holds raw little-endian tensors and a JSON header. Loading validates the
framing by hand first (bounded: :mod:`ood_core.state_format`; reading: :mod:`ood_core.state_io`), then the
metadata, the digest, the tensors' names, dtypes and shapes against the class's ``state_spec``, and finally
the values (:meth:`~ood_core.api.Detector.check_state`). Any problem raises :class:`~ood_core.errors.InvalidStateError`
with a reason that names it (and never a file-system path or an object's repr).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save
from torch import Tensor

import ood_core
from ood_core.api import Detector, TensorSpec
from ood_core.calibration import Calibration
from ood_core.errors import InvalidStateError, RequiresFitException
from ood_core.state_format import MAX_HEADER_BYTES, MAX_TENSORS, excerpt
from ood_core.state_io import Source, read_source, tensor_digest
from ood_core.utils import all_finite

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "Source",
    "StateInfo",
    "detector_class",
    "load_detector",
    "read_state_info",
    "save_detector",
    "write_atomic",
]

FORMAT = "ood-serve/detector-state"
FORMAT_VERSION = "2"
#: versions :func:`load_detector` reads; ``"1"`` predates ``tensor_sha256``
READABLE_VERSIONS = ("1", "2")
DIGEST_KEY = "tensor_sha256"
#: longest reason quoted from a constructor's exception (its message may quote a hostile hyperparameter)
MAX_REASON_CHARS = 300
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


def detector_class(name: str) -> type[Detector]:
    """The detector class saved under ``name`` (one of ``ood_core.detector.__all__``)."""
    import ood_core.detector as det_pkg

    obj = getattr(det_pkg, name) if name in det_pkg.__all__ else None
    if not (isinstance(obj, type) and issubclass(obj, Detector)):
        raise InvalidStateError(f"unknown detector class {excerpt(name)}")
    return obj


def save_detector(
    detector: Detector, path: str | os.PathLike[str] | None = None, calibration: Calibration | None = None
) -> bytes:
    """Serialize a fitted detector (and optional calibration); write it atomically to ``path`` if given.

    Returns the file's bytes. Raises :class:`RequiresFitException` for an unfitted detector and
    ``ValueError`` when a constructor argument cannot be stored (e.g. a custom scoring callable).
    """
    if not detector.is_fitted:
        raise RequiresFitException(f"{type(detector).__name__} is not fitted: nothing to save")
    hparams = detector.hparams()
    try:
        hparams_json = json.dumps(hparams, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hyperparameters of {type(detector).__name__} are not JSON-serializable: {exc}") from exc
    tensors = {name: getattr(detector, name).detach().cpu().contiguous() for name in detector.state_spec}
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
        tensors.update(calibration.to_tensors())
        metadata["calibration"] = calibration.to_metadata()
    metadata[DIGEST_KEY] = tensor_digest(tensors)
    data = st_save(tensors, metadata=metadata)
    if path is not None:
        write_atomic(Path(path), data)
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reject_constant(name: str) -> Any:
    raise InvalidStateError(f"non-finite number {name} in the state metadata")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999, which Python's json reads as inf
        raise InvalidStateError(f"non-finite number {text[:40]} in the state metadata")
    return value


def _json_field(meta: dict[str, str], key: str) -> Any:
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


def _info(meta: dict[str, str]) -> StateInfo:
    if meta.get("format") != FORMAT:
        raise InvalidStateError(f"not an ood-serve detector state (format={excerpt(meta.get('format'))})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise InvalidStateError(f"unsupported state format version {excerpt(meta.get('format_version'))}")
    hparams = _json_field(meta, "hparams")
    if not isinstance(hparams, dict):
        raise InvalidStateError("state 'hparams' must be a JSON object")
    dims = {}
    for key in ("feature_dim", "num_classes"):
        val = _json_field(meta, key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
            raise InvalidStateError(f"state '{key}' must be a positive integer or null, got {excerpt(val)}")
        dims[key] = val
    version = meta.get("library_version")
    if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS or _VERSION.fullmatch(version) is None:
        raise InvalidStateError(f"state 'library_version' must be a version string, got {excerpt(version)}")
    calib = _json_field(meta, "calibration") if "calibration" in meta else None
    return StateInfo(
        cls=str(meta.get("class")),
        hparams=hparams,
        feature_dim=dims["feature_dim"],
        num_classes=dims["num_classes"],
        input_kind=str(meta.get("input_kind")),
        library_version=version,
        calibration=calib,
    )


def read_state_info(source: Source) -> StateInfo:
    """Validate the framing and header of a saved state and return its description.

    Only the header is read (from a path: its first bytes); the tensors and their digest are checked by
    :func:`load_detector`."""
    header, _ = read_source(source, with_tensors=False)
    return _info(header.metadata)


def _check_digest(meta: dict[str, str], tensors: dict[str, Tensor]) -> None:
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


def _check_tensors(cls: type[Detector], info: StateInfo, tensors: dict[str, Tensor]) -> None:
    """Names, dtypes and shapes of the tensors against the class's ``state_spec`` and the metadata; finite."""
    spec: dict[str, TensorSpec] = cls.state_spec
    present = {k for k in tensors if not k.startswith("calibration.")}
    missing, extra = sorted(set(spec) - present), sorted(present - set(spec))
    extra += sorted(k for k in tensors if k.startswith("calibration.") and k not in Calibration.TENSORS)
    if missing:
        raise InvalidStateError(f"{info.cls} state is missing tensors: {', '.join(missing)}")
    if extra:
        raise InvalidStateError(f"{info.cls} state has unexpected tensors: {', '.join(extra)}")
    symbols: dict[str, int] = {}
    if info.feature_dim is not None:
        symbols["D"] = info.feature_dim
    if info.num_classes is not None:
        symbols["C"] = info.num_classes
    for name, ts in spec.items():
        t = tensors[name]
        if t.dtype != ts.dtype:
            raise InvalidStateError(f"{info.cls} tensor '{name}' has dtype {t.dtype}, expected {ts.dtype}")
        if t.dim() != len(ts.dims):
            raise InvalidStateError(f"{info.cls} tensor '{name}' has {t.dim()} dims, expected {len(ts.dims)}")
        for axis, (got, want) in enumerate(zip(t.shape, ts.dims, strict=True)):
            expected = symbols.setdefault(want, got) if isinstance(want, str) else want
            if got != expected:
                raise InvalidStateError(
                    f"{info.cls} tensor '{name}' has size {got} on axis {axis}, expected {expected} ({want})"
                )
        if not all_finite(t):  # before from_state sees it (ViM inverts w); check_state repeats it after fits
            raise InvalidStateError(f"{info.cls} tensor '{name}' contains NaN or Inf")


def _build(cls: type[Detector], info: StateInfo, tensors: dict[str, Tensor], nets: dict[str, Any]) -> Detector:
    """``cls.from_state``, with every failure of a hostile hyperparameter turned into InvalidStateError."""
    networks = sorted(set(info.hparams) & set(cls.external_modules))
    if networks:
        raise InvalidStateError(f"{info.cls} state 'hparams' must not set the networks {', '.join(networks)}")
    try:
        return cls.from_state(dict(info.hparams), tensors, nets)
    except InvalidStateError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        reason = str(exc)
        reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
        raise InvalidStateError(f"cannot build {info.cls} from the saved hyperparameters: {reason}") from None
    except Exception as exc:  # e.g. a RuntimeError of a tensor operation on odd values: no details passed on
        raise InvalidStateError(f"cannot build {info.cls} from the saved state ({type(exc).__name__})") from None


def load_detector(source: Source, model: Any = None, **modules: Any) -> Detector:
    """Load a detector saved by :func:`save_detector`, from a path or bytes.

    ``model`` and other networks (``head``, ``backbone``) are passed again, as they are not part of the
    state. The detector comes back fitted, on the CPU, with ``detector.calibration`` set (or ``None``).
    From a path, the tensors are read straight into their final memory (peak about their size).
    """
    header, tensors = read_source(source, with_tensors=True)
    meta = header.metadata
    info = _info(meta)
    _check_digest(meta, tensors)
    cls = detector_class(info.cls)
    if info.input_kind != cls.input_kind:
        raise InvalidStateError(
            f"{info.cls} state says input_kind={excerpt(info.input_kind)}, class has {cls.input_kind!r}"
        )
    _check_tensors(cls, info, tensors)
    nets = dict(modules)
    if "model" in cls.external_modules:
        nets["model"] = model
    detector = _build(cls, info, tensors, nets)
    for name in cls.state_spec:
        setattr(detector, name, tensors[name])  # tensors own their memory (read_source): no copy
    detector._mark_fitted()
    for key, want in (("feature_dim", info.feature_dim), ("num_classes", info.num_classes)):
        got = getattr(detector, key)
        if got != want:
            raise InvalidStateError(f"{info.cls} state metadata says {key}={want}, tensors give {got}")
    try:
        detector.check_state()
    except InvalidStateError:
        raise
    except Exception as exc:  # a check tripping over odd values: the state is refused all the same
        raise InvalidStateError(f"{info.cls} state values cannot be checked ({type(exc).__name__})") from None
    calibration = None
    if info.calibration is not None:
        calibration = Calibration.from_saved(tensors, meta["calibration"])
    elif any(k.startswith("calibration.") for k in tensors):
        raise InvalidStateError("state has calibration tensors but no calibration metadata")
    detector.calibration = calibration
    return detector
