"""Reading a detector state from bytes or a path, and the digest of its tensors.

:func:`read_source` validates the framing (:mod:`ood_core.state_format`) before anything else is read. From a
path only the header is read into memory as bytes; the tensors are then read by safetensors straight into
fresh tensors (``pread``), so that peak memory is about the tensors' size: never a ``bytes`` copy of the file
plus the tensors. :func:`tensor_digest` defines the ``tensor_sha256`` metadata field.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from torch import Tensor

from ood_core.errors import InvalidStateError
from ood_core.state_format import DTYPES, Header, dtype_code, header_from_bytes, header_from_file

#: a saved state: its bytes, or the path of its file
Source = str | os.PathLike[str] | bytes | bytearray | memoryview


def read_source(source: Source, with_tensors: bool) -> tuple[Header, dict[str, Tensor]]:
    """The validated header of a state and, if ``with_tensors``, its tensors (owning writable memory).

    Raises :class:`InvalidStateError`; an unreadable file's message gives the OS reason but not the path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        header = header_from_bytes(view)
        if not with_tensors:
            return header, {}
        return header, tensors_from_bytes(source if isinstance(source, bytes) else bytes(view), header)
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            header = header_from_file(fh)
    except OSError as exc:  # the message names no path: it may reach a remote client
        raise InvalidStateError(f"cannot read state file: {exc.strerror or type(exc).__name__}") from None
    return header, (tensors_from_file(path, header) if with_tensors else {})


def check_decoded(header: Header, tensors: Mapping[str, Tensor]) -> None:
    """What safetensors decoded matches the validated header (names, dtypes, shapes)."""
    if set(tensors) != set(header.entries):
        raise InvalidStateError("state tensors changed while loading: safetensors read other names")
    for name, entry in header.entries.items():
        t = tensors[name]
        if t.dtype != DTYPES[entry.dtype][0] or tuple(t.shape) != entry.shape:
            raise InvalidStateError(f"state tensor '{name}' changed while loading: other dtype or shape")


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (lowercase hex) over the tensors, in ascending order of their names (code-point order).

    For each tensor the hash is fed, with ``u64(n)`` the 8-byte little-endian encoding of ``n``:
    ``u64(len(name)) name u64(len(code)) code u64(rank) u64(dim_0) ... u64(dim_last) u64(len(data)) data``,
    where ``name`` is UTF-8, ``code`` the safetensors dtype code (``"F64"``, ...) in ASCII and ``data`` the
    tensor's raw bytes in C order, little-endian: exactly the bytes of its span in the file's data region.
    The length prefixes make the encoding unambiguous. The metadata is not covered.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        raw = _raw_bytes(t)
        for part in (name.encode("utf-8"), dtype_code(t.dtype).encode("ascii")):
            digest.update(_u64(len(part)))
            digest.update(part)
        digest.update(_u64(t.dim()))
        for size in t.shape:
            digest.update(_u64(size))
        digest.update(_u64(raw.nbytes))
        digest.update(raw)
    return digest.hexdigest()


def _raw_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is a contiguous CPU tensor (little-endian hosts)."""
    flat = t.cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def tensors_from_bytes(data: bytes, header: Header) -> dict[str, Tensor]:
    """Decode the tensors of a validated in-memory state into tensors that own their (writable) memory."""
    try:
        decoded = st_load(data)
    except Exception:  # safetensors raises its own error type; the framing was validated, so this is rare
        raise InvalidStateError("state is not a valid safetensors file: safetensors cannot decode it") from None
    check_decoded(header, decoded)
    return {name: t.clone() for name, t in decoded.items()}  # safetensors' tensors view read-only bytes


def tensors_from_file(path: str, header: Header) -> dict[str, Tensor]:
    """Read the tensors of a validated state file straight into fresh tensors (``pread``, no memory map).

    Peak memory is about the tensors' size: no ``bytes`` copy of the file is made. The result is checked
    against ``header``, so a file replaced between the two reads is refused (and its digest is checked later).
    """
    try:
        try:
            handle = safe_open(path, framework="pt", backend="pread")
            mapped = False
        except TypeError:  # safetensors without the pread backend: memory-mapped, copied out below
            handle = safe_open(path, framework="pt")
            mapped = True
        with handle as fh:
            metadata = fh.metadata() or {}
            tensors = fh.get_tensors()
    except Exception:  # safetensors raises its own error type (messages may name the file: not passed on)
        raise InvalidStateError("state file is not a valid safetensors file: safetensors cannot decode it") from None
    if metadata != header.metadata:
        raise InvalidStateError("state file changed while loading: other metadata")
    check_decoded(header, tensors)
    return {name: t.clone() for name, t in tensors.items()} if mapped else tensors
