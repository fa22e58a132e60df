"""Writing state files: byte-deterministic safetensors (:func:`canonical_safetensors`) and atomic writes
(:func:`write_atomic`).

``safetensors.torch.save`` keeps the header's ``__metadata__`` in a Rust ``HashMap``, whose iteration order is
randomized per process and call: the same tensors and metadata give different bytes (and a different sha256)
from one save to the next. :func:`canonical_safetensors` keeps safetensors' data region (its tensor order, by
dtype alignment then name, is already deterministic) and rewrites the header as compact JSON with
``__metadata__`` first, its keys sorted, then the tensor entries in data order, padded with spaces to a
multiple of 8 bytes as safetensors does. Any safetensors reader reads the result; files written before (with
their metadata in any order) read exactly as they did.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save
from torch import Tensor

__all__ = ["canonical_json", "canonical_safetensors", "write_atomic"]

HEADER_ALIGNMENT = 8
"""The header is padded with spaces to a multiple of this many bytes (so the data region starts aligned)."""


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no NaN / Infinity (the text stored in a state's metadata)."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def canonical_safetensors(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` and ``metadata``, the same for the same inputs in any process."""
    data = st_save(dict(tensors), metadata=dict(metadata))
    size = int.from_bytes(data[:8], "little")
    header: dict[str, Any] = json.loads(data[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    ordered: dict[str, Any] = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(data)[8 + size :]))


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
