"""Save and load fitted detectors as one safetensors file.

Layout of the file:

* tensors: every buffer named in the detector's :attr:`~ood_core.api.Detector.state_spec` (the fitted
  state and constructor tensors such as ViM's ``w``/``b``), plus ``calibration.quantiles`` when a
  :class:`~ood_core.calibration.Calibration` is attached;
* header metadata (strings): the keys of :mod:`ood_core.state_metadata` (class, hyperparameters, dimensions,
  versions, the tensors' digest, the calibration).

The bytes are deterministic (:func:`~ood_core.state_write.canonical_safetensors`: sorted metadata keys, JSON
with sorted keys inside): two identical fits give the same file, hence the same sha256.

Nothing is unpickled: safetensors holds raw little-endian tensors and a JSON header. Loading validates the
framing by hand first (bounded: :mod:`ood_core.state_format`; reading: :mod:`ood_core.state_io`), then the
metadata, the digest, the tensors' names, dtypes and shapes against the class's ``state_spec``, and finally
the values (:meth:`~ood_core.api.Detector.check_state`). Any problem raises :class:`~ood_core.errors.InvalidStateError`
with a reason that names it (and never a file-system path or an object's repr).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ood_core.api import Detector, TensorSpec
from ood_core.calibration import Calibration
from ood_core.errors import InvalidStateError, RequiresFitException
from ood_core.state_format import MAX_HEADER_BYTES, MAX_TENSORS, excerpt
from ood_core.state_io import Source, read_source
from ood_core.state_metadata import (
    FORMAT,
    FORMAT_VERSION,
    StateInfo,
    check_digest,
    state_info,
    state_metadata,
)
from ood_core.state_write import canonical_safetensors, write_atomic
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

#: longest reason quoted from a constructor's exception (its message may quote a hostile hyperparameter)
MAX_REASON_CHARS = 300


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
    tensors = {name: getattr(detector, name).detach().cpu().contiguous() for name in detector.state_spec}
    if calibration is not None:
        tensors.update(calibration.to_tensors())
    metadata = state_metadata(detector, tensors, None if calibration is None else calibration.to_metadata())
    data = canonical_safetensors(tensors, metadata)
    if path is not None:
        write_atomic(Path(path), data)
    return data


def read_state_info(source: Source) -> StateInfo:
    """Validate the framing and header of a saved state and return its description.

    Only the header is read (from a path: its first bytes); the tensors and their digest are checked by
    :func:`load_detector`."""
    header, _ = read_source(source, with_tensors=False)
    return state_info(header.metadata)


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
    info = state_info(meta)
    check_digest(meta, tensors)
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
