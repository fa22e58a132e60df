"""The safetensors framing of a saved detector state, validated by hand before safetensors decodes anything.

A safetensors file is ``N`` (8 bytes, little-endian u64), ``N`` bytes of UTF-8 JSON header, then the data
region. The header is an object: ``"__metadata__"`` (optional, a str -> str map) and, for every tensor, an
entry ``{"dtype": CODE, "shape": [dims], "data_offsets": [begin, end]}`` with offsets relative to the data
region. :func:`header_from_bytes` / :func:`header_from_file` check, in this order and with bounds first:

* the header length is at most :data:`MAX_HEADER_BYTES` and fits in the file;
* at most :data:`MAX_TENSORS` entries (counted in the raw bytes before ``json.loads``, and again after);
* the header starts with ``{`` and is a UTF-8 JSON object without duplicate keys, ``NaN``/``Infinity`` or
  non-finite numbers (``1e999``);
* every entry has exactly the three fields, a known dtype (:data:`DTYPES`), a shape of at most
  :data:`MAX_RANK` non-negative ints and offsets ``0 <= begin <= end`` spanning ``prod(shape) * itemsize``;
* the entries tile the data region exactly: sorted by offset each starts where the previous ended, the first
  at 0, the last at the end of the file (no overlap, gap, truncation or trailing bytes).

Anything else raises :class:`~ood_core.errors.InvalidStateError` with a message that says what is wrong and
quotes at most a short excerpt of the offending JSON value (never a path or an object's repr).

Reading a state's tensors and their digest live in :mod:`ood_core.state_io`.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ood_core.errors import InvalidStateError

#: largest accepted header (1 MiB). A real state's header is a few hundred bytes: at most six tensor entries
#: and short metadata (hyperparameters, calibration ``n``/``target_tpr``); calibration scores are tensors.
MAX_HEADER_BYTES = 1 << 20
#: most tensors in one state (a detector has at most six, calibration one more)
MAX_TENSORS = 256
#: most dimensions of one tensor (state tensors have at most three)
MAX_RANK = 8
#: longest tensor name, in characters
MAX_NAME_CHARS = 256
#: largest size of one dimension (beyond it no file could hold the tensor)
MAX_DIM = 1 << 62
#: the entry fields safetensors writes, all required, no others
ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

#: safetensors dtype code -> (torch dtype, bytes per element), for the dtypes a state may hold
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F64": (torch.float64, 8),
}
_CODES = {dtype: code for code, (dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry, validated."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: metadata, tensor entries and where the data region lies."""

    metadata: dict[str, str]
    entries: dict[str, TensorEntry]
    data_start: int
    data_size: int


def excerpt(value: Any, limit: int = 40) -> str:
    """Short ``repr`` of a parsed JSON value (str, number, bool, None, list or dict) for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype; ``ValueError`` for one a state cannot hold."""
    if dtype not in _CODES:
        raise ValueError(f"dtype {dtype} cannot be stored in a detector state")
    return _CODES[dtype]


def header_length(prefix: bytes, total: int) -> int:
    """The header length from the first 8 bytes of a file of ``total`` bytes, bounded."""
    if total < 8 or len(prefix) < 8:
        raise InvalidStateError(f"state is truncated: {total} bytes, fewer than the 8 of the header length")
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise InvalidStateError(
            f"state is truncated or not a safetensors file: header length {length} exceeds the limit of "
            f"{MAX_HEADER_BYTES} bytes (MAX_HEADER_BYTES, 1 MiB)"
        )
    if 8 + length > total:
        raise InvalidStateError(f"state is truncated: the header runs past the end ({length} bytes, file has {total})")
    return length


def header_from_bytes(data: memoryview) -> Header:
    """Validate the framing of a whole state held in memory."""
    length = header_length(bytes(data[:8]), len(data))
    return parse_header(bytes(data[8 : 8 + length]), len(data))


def header_from_file(fh: BinaryIO) -> Header:
    """Validate the framing of a state file, reading only its first ``8 + N`` bytes."""
    info = os.fstat(fh.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise InvalidStateError("cannot read state file: not a regular file")
    length = header_length(fh.read(8), info.st_size)
    raw = fh.read(length)
    if len(raw) != length:
        raise InvalidStateError("state is truncated: the file ended while reading the header")
    return parse_header(raw, info.st_size)


def parse_header(raw: bytes, total: int) -> Header:
    """Validate header bytes ``raw`` of a file of ``total`` bytes (see the module docstring)."""
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # cheap bound before any parsing
        raise _too_many()
    if not raw.startswith(b"{"):
        raise InvalidStateError("state header is not a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidStateError("state header is not valid UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
    except InvalidStateError:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidStateError(f"state header is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # over-long integers, nesting too deep
        raise InvalidStateError(f"state header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise InvalidStateError("state header is not a JSON object")
    metadata = _metadata(obj.pop("__metadata__", {}))
    if len(obj) > MAX_TENSORS:
        raise _too_many()
    entries = {_name(name): _entry(name, spec) for name, spec in obj.items()}
    data_start = 8 + len(raw)
    data_size = total - data_start
    _check_layout(entries, data_size)
    return Header(metadata, entries, data_start, data_size)


def _too_many() -> InvalidStateError:
    return InvalidStateError(f"state has more than {MAX_TENSORS} tensors (MAX_TENSORS)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidStateError(f"state header has the key {excerpt(key)} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidStateError(f"state header holds the non-finite number {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidStateError(f"state header holds the non-finite number {text[:40]}")
    return value


def _is_text(value: Any) -> bool:
    """A str that is valid Unicode (JSON escapes can produce lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata(meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise InvalidStateError("state metadata is not a JSON object")
    for key, value in meta.items():
        if not _is_text(key) or not _is_text(value):
            raise InvalidStateError(f"state metadata must map strings to strings, got {excerpt(key)}: {excerpt(value)}")
    return meta


def _name(name: str) -> str:
    if not _is_text(name) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidStateError(
            f"state tensor name {excerpt(name)} is invalid (1 to {MAX_NAME_CHARS} printable characters)"
        )
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, spec: Any) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != ENTRY_FIELDS:
        raise InvalidStateError(f"state tensor '{name}' must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidStateError(f"state tensor '{name}' has an unknown dtype {excerpt(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise InvalidStateError(
            f"state tensor '{name}' shape must be a list of at most {MAX_RANK} non-negative integers, "
            f"got {excerpt(shape)}"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise InvalidStateError(
            f"state tensor '{name}' data_offsets must be two non-negative integers, got {excerpt(offsets)}"
        )
    begin, end = offsets
    if begin > end:
        raise InvalidStateError(f"state tensor '{name}' data_offsets end before they begin: {begin} > {end}")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != nbytes:
        raise InvalidStateError(f"state tensor '{name}' spans {end - begin} bytes, its shape and dtype need {nbytes}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_layout(entries: dict[str, TensorEntry], data_size: int) -> None:
    """The entries tile ``[0, data_size)`` exactly, in offset order."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise InvalidStateError(f"state tensor '{name}' overlaps the previous tensor's data")
        if entry.begin > position:
            raise InvalidStateError(f"state has a gap of unused bytes before tensor '{name}'")
        position = entry.end
    if position > data_size:
        raise InvalidStateError(f"state is truncated: tensors need {position} bytes of data, file has {data_size}")
    if position < data_size:
        raise InvalidStateError(
            f"state is padded: {data_size - position} trailing bytes after the tensors ({position} bytes of data)"
        )
