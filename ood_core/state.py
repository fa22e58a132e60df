"""Save and load fitted detectors as one safetensors file.

Layout of the file:

* tensors: every buffer named in the detector's :attr:`~ood_core.api.Detector.state_spec` (the fitted
  state and constructor tensors such as ViM's ``w``/``b``), plus ``calibration.*`` when a
  :class:`~ood_core.calibration.Calibration` is attached;
* header metadata (strings): ``format``, ``format_version``, ``class``, ``hparams`` (JSON of the
  constructor arguments), ``feature_dim`` and ``num_classes`` (JSON int or null), ``input_kind``,
  ``library_version`` and, optionally, ``calibration`` (JSON).

Nothing is unpickled: safetensors holds raw little-endian tensors and a JSON header. Loading validates
everything and raises :class:`~ood_core.errors.InvalidStateError` with the reason on any mismatch.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

import ood_core
from ood_core.api import Detector, TensorSpec
from ood_core.calibration import Calibration
from ood_core.errors import InvalidStateError, RequiresFitException

FORMAT = "ood-serve/detector-state"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: accepted ``library_version`` values (PEP 440-like: release numbers, optional suffix such as ``.dev1``)
_VERSION = re.compile(r"\d+(\.\d+)*([.+-]?[0-9A-Za-z]+)*")

Source = str | os.PathLike[str] | bytes | bytearray | memoryview


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
        raise InvalidStateError(f"unknown detector class {name!r}")
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


def _read(source: Source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise InvalidStateError(f"cannot read state file {source}: {exc}") from exc


def _parse(data: bytes) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Check the safetensors framing by hand (clear messages for truncation), then decode."""
    if len(data) < 8:
        raise InvalidStateError("state is truncated: fewer than 8 bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise InvalidStateError("state is truncated or not a safetensors file: header runs past the end")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidStateError(f"state header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidStateError("state header is not a JSON object")
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    body = len(data) - 8 - header_len
    if max(ends, default=0) != body:
        raise InvalidStateError(
            f"state is truncated or padded: tensors need {max(ends, default=0)} bytes, file has {body}"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise InvalidStateError(f"state is not a valid safetensors file: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise InvalidStateError("state metadata is not a JSON object")
    return metadata, tensors


def _reject_constant(name: str) -> Any:
    raise InvalidStateError(f"non-finite number {name} in the state metadata")


def _json_field(meta: dict[str, str], key: str) -> Any:
    """Strict JSON of a metadata field: ``NaN`` and ``Infinity`` (which Python's json accepts) are rejected."""
    if key not in meta:
        raise InvalidStateError(f"state metadata lacks '{key}'")
    try:
        return json.loads(meta[key], parse_constant=_reject_constant)
    except (TypeError, json.JSONDecodeError) as exc:
        raise InvalidStateError(f"state metadata '{key}' is not valid JSON") from exc


def _info(meta: dict[str, str]) -> StateInfo:
    if meta.get("format") != FORMAT:
        raise InvalidStateError(f"not an ood-serve detector state (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InvalidStateError(f"unsupported state format version {meta.get('format_version')!r}")
    hparams = _json_field(meta, "hparams")
    if not isinstance(hparams, dict):
        raise InvalidStateError("state 'hparams' must be a JSON object")
    dims = {}
    for key in ("feature_dim", "num_classes"):
        val = _json_field(meta, key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
            raise InvalidStateError(f"state '{key}' must be a positive integer or null, got {val!r}")
        dims[key] = val
    version = meta.get("library_version")
    if not isinstance(version, str) or _VERSION.fullmatch(version) is None:
        raise InvalidStateError(f"state 'library_version' must be a version string, got {version!r}")
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
    """Validate the framing and header of a saved state and return its description."""
    meta, _ = _parse(_read(source))
    return _info(meta)


def _check_tensors(cls: type[Detector], info: StateInfo, tensors: dict[str, Tensor]) -> None:
    spec: dict[str, TensorSpec] = cls.state_spec
    present = {k for k in tensors if not k.startswith("calibration.")}
    missing, extra = sorted(set(spec) - present), sorted(present - set(spec))
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
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidStateError(f"{info.cls} tensor '{name}' contains NaN or Inf")


def load_detector(source: Source, model: Any = None, **modules: Any) -> Detector:
    """Load a detector saved by :func:`save_detector`, from a path or bytes.

    ``model`` and other networks (``head``, ``backbone``) are passed again, as they are not part of the
    state. The detector comes back fitted, on the CPU, with ``detector.calibration`` set (or ``None``).
    """
    meta, tensors = _parse(_read(source))
    info = _info(meta)
    cls = detector_class(info.cls)
    if info.input_kind != cls.input_kind:
        raise InvalidStateError(f"{info.cls} state says input_kind={info.input_kind!r}, class has {cls.input_kind!r}")
    _check_tensors(cls, info, tensors)
    nets = dict(modules)
    if "model" in cls.external_modules:
        nets["model"] = model
    try:
        detector = cls.from_state(dict(info.hparams), tensors, nets)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidStateError(f"cannot build {info.cls} from the saved hyperparameters: {exc}") from exc
    for name in cls.state_spec:
        setattr(detector, name, tensors[name].clone())
    detector._mark_fitted()
    for key, want in (("feature_dim", info.feature_dim), ("num_classes", info.num_classes)):
        got = getattr(detector, key)
        if got != want:
            raise InvalidStateError(f"{info.cls} state metadata says {key}={want}, tensors give {got}")
    calibration = None
    if info.calibration is not None:
        calibration = Calibration.from_saved(tensors, meta["calibration"])
    elif any(k.startswith("calibration.") for k in tensors):
        raise InvalidStateError("state has calibration tensors but no calibration metadata")
    detector.calibration = calibration
    return detector
