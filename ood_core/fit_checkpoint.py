"""Checkpoints of a fit in progress: save the partial statistics of a detector as safetensors, resume later.

A fit checkpointed mid-stream and resumed gives the same state as an uninterrupted fit: the statistics are the
detector's exact accumulators (:meth:`~ood_core.api.Detector.fit_statistics`), restored by merging them into
an empty fit of the same pass.

Layout of the file (safetensors: raw little-endian tensors and a JSON header, nothing pickled):

* tensors: ``stats.<name>`` (the current pass's statistics), ``state.<name>`` (every state buffer that is set:
  constructor tensors such as ViM's ``w``/``b`` and the results of earlier passes, e.g. ViM's ``principal``)
  and ``context.<name>`` (other results of earlier passes a later one needs, e.g. ReAct's histogram);
* header metadata (strings): ``format``, ``format_version``, ``class``, ``hparams`` (JSON), ``library_version``,
  ``fit_pass`` and ``fit_passes`` (JSON ints), ``user_meta`` (JSON object of strings) and ``tensor_sha256``
  (:func:`~ood_core.state_io.tensor_digest` of all the tensors).

Loading validates like :func:`ood_core.state.load_detector`: the framing by hand first (bounded header,
:mod:`ood_core.state_format`), the metadata (known format, known detector class, strict JSON), the digest,
the tensors (known prefixes, state tensors of the class's ``state_spec`` dtype and rank, all finite), and the
statistics themselves (the detector's merge refuses names and shapes that do not fit). Any problem raises
:class:`~ood_core.errors.InvalidStateError` naming it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

import ood_core
from ood_core.api import FIT_SIGNATURE_KEY, Detector
from ood_core.errors import InvalidStateError
from ood_core.state import MAX_REASON_CHARS, detector_class
from ood_core.state_format import excerpt
from ood_core.state_io import Source, read_source, tensor_digest
from ood_core.state_metadata import MAX_VERSION_CHARS, json_field
from ood_core.state_write import canonical_json, canonical_safetensors, write_atomic
from ood_core.utils import all_finite

__all__ = ["FORMAT", "FORMAT_VERSION", "load_fit_checkpoint", "save_fit_checkpoint"]

FORMAT = "ood-serve/fit-checkpoint"
FORMAT_VERSION = "1"
PREFIXES = ("stats.", "state.", "context.")
#: most user metadata entries, and the longest key and value
MAX_META_ENTRIES, MAX_META_CHARS = 64, 4096
_VERSION = re.compile(r"\d+(\.\d+)*([0-9A-Za-z]|[.+-][0-9A-Za-z])*")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def _check_meta(meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or len(meta) > MAX_META_ENTRIES:
        raise ValueError(f"meta must be a dict of at most {MAX_META_ENTRIES} strings")
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str) or max(len(key), len(value)) > MAX_META_CHARS:
            raise ValueError(f"meta must map strings to strings of at most {MAX_META_CHARS} characters")
    return dict(meta)


def save_fit_checkpoint(
    detector: Detector, path: str | os.PathLike[str] | None = None, meta: dict[str, str] | None = None
) -> bytes:
    """Serialize the fit in progress (class, hyperparameters, library version, pass, ``meta`` and the current
    pass's statistics); write it atomically to ``path`` if given. Returns the file's bytes.

    A detector with no fit in progress is checkpointed at the start of pass 0 (empty statistics). Raises
    ``ValueError`` for a detector that needs no fit or whose hyperparameters cannot be stored."""
    if detector.fit_passes == 0:
        raise ValueError(f"{type(detector).__name__} needs no fit: there is nothing to checkpoint")
    user_meta = _check_meta(meta or {})
    try:
        hparams_json = canonical_json(detector.hparams())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hyperparameters of {type(detector).__name__} cannot be stored: {exc}") from exc
    tensors = {f"stats.{k}": t for k, t in detector.fit_statistics().items() if k != FIT_SIGNATURE_KEY}
    for name in detector.state_spec:
        buf = getattr(detector, name)
        if buf.numel() > 0:
            tensors[f"state.{name}"] = buf.detach().cpu().contiguous()
    for name, t in detector._fit_context().items():
        tensors[f"context.{name}"] = t.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": type(detector).__name__,
        "hparams": hparams_json,
        "library_version": ood_core.__version__,
        "fit_pass": json.dumps(detector.fit_pass),
        "fit_passes": json.dumps(detector.fit_passes),
        "user_meta": canonical_json(user_meta),
        "tensor_sha256": tensor_digest(tensors),
    }
    data = canonical_safetensors(tensors, metadata)
    if path is not None:
        write_atomic(Path(path), data)
    return data


def _int_field(meta: dict[str, str], key: str) -> int:
    value = json_field(meta, key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1000:
        raise InvalidStateError(f"fit checkpoint '{key}' must be a small non-negative integer, got {excerpt(value)}")
    return value


def _header(meta: dict[str, str], tensors: dict[str, Tensor]) -> tuple[type[Detector], dict[str, Any], dict[str, str]]:
    """The class, hyperparameters and user metadata, validated, and the digest checked."""
    if meta.get("format") != FORMAT:
        raise InvalidStateError(f"not an ood-serve fit checkpoint (format={excerpt(meta.get('format'))})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InvalidStateError(f"unsupported fit checkpoint version {excerpt(meta.get('format_version'))}")
    version = meta.get("library_version")
    if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS or _VERSION.fullmatch(version) is None:
        raise InvalidStateError(f"fit checkpoint 'library_version' must be a version string, got {excerpt(version)}")
    want = meta.get("tensor_sha256")
    if want is None or _HEX_DIGEST.fullmatch(want) is None:
        raise InvalidStateError("fit checkpoint 'tensor_sha256' must be 64 lowercase hexadecimal digits")
    if tensor_digest(tensors) != want:
        raise InvalidStateError("tensor digest mismatch: the fit checkpoint is corrupted")
    hparams = json_field(meta, "hparams")
    if not isinstance(hparams, dict):
        raise InvalidStateError("fit checkpoint 'hparams' must be a JSON object")
    user_meta = json_field(meta, "user_meta")
    try:
        user_meta = _check_meta(user_meta)
    except ValueError as exc:
        raise InvalidStateError(f"fit checkpoint 'user_meta': {exc}") from None
    return detector_class(str(meta.get("class"))), hparams, user_meta


def _split(cls: type[Detector], tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Tensors by prefix; state tensors checked against ``state_spec``; every tensor finite."""
    parts: dict[str, dict[str, Tensor]] = {prefix: {} for prefix in PREFIXES}
    for name, t in tensors.items():
        prefix = next((p for p in PREFIXES if name.startswith(p) and len(name) > len(p)), None)
        if prefix is None:
            raise InvalidStateError(f"fit checkpoint tensor {excerpt(name)} has no known prefix {PREFIXES}")
        if not all_finite(t):
            raise InvalidStateError(f"fit checkpoint tensor {excerpt(name)} contains NaN or Inf")
        parts[prefix][name[len(prefix) :]] = t
    for name, t in parts["state."].items():
        spec = cls.state_spec.get(name)
        if spec is None:
            raise InvalidStateError(f"{cls.__name__} has no state tensor {excerpt(name)}")
        if t.dtype != spec.dtype or t.dim() != len(spec.dims):
            raise InvalidStateError(
                f"{cls.__name__} state tensor '{name}' must be {spec.dtype} of {len(spec.dims)} dims"
            )
    return parts


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def load_fit_checkpoint(source: Source, model: Any = None, **modules: Any) -> tuple[Detector, dict[str, str]]:
    """Load a checkpoint of :func:`save_fit_checkpoint` (a path or bytes): the detector in the checkpointed pass
    with its statistics, ready for more ``partial_fit*`` calls, and the user metadata.

    ``model`` and other networks (``head``, ``backbone``) are passed again, as they are not part of it."""
    header, tensors = read_source(source, with_tensors=True)
    cls, hparams, user_meta = _header(header.metadata, tensors)
    fit_pass, fit_passes = _int_field(header.metadata, "fit_pass"), _int_field(header.metadata, "fit_passes")
    parts = _split(cls, tensors)
    networks = sorted(set(hparams) & set(cls.external_modules))
    if networks:
        raise InvalidStateError(f"{cls.__name__} checkpoint 'hparams' must not set the networks {', '.join(networks)}")
    nets = dict(modules)
    if "model" in cls.external_modules:
        nets["model"] = model
    try:
        detector = cls.from_state(dict(hparams), parts["state."], nets)
        for name, t in parts["state."].items():
            setattr(detector, name, t)
        if detector.fit_passes != fit_passes:
            raise ValueError(f"the checkpoint has {fit_passes} passes, {cls.__name__} needs {detector.fit_passes}")
        if json.loads(json.dumps(detector.hparams())) != hparams:
            raise ValueError("the detector rebuilt from the checkpoint has other hyperparameters")
        detector._restart_pass(fit_pass)
        detector._load_fit_context(parts["context."])
        detector._merge_fit_statistics(parts["stats."])
    except InvalidStateError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError, IndexError) as exc:
        raise InvalidStateError(f"cannot resume the {cls.__name__} fit from the checkpoint: {_reason(exc)}") from None
    return detector, user_meta
