"""Helpers for tests that take a saved state apart and rebuild it (with a digest that matches the edit)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from ood_core.state_io import tensor_digest

Tensors = dict[str, torch.Tensor]
Meta = dict[str, str]


def split_state(data: bytes) -> tuple[Tensors, Meta]:
    """The tensors (writable copies) and the metadata of a saved state."""
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    return {k: v.clone() for k, v in load(data).items()}, meta


def resave(tensors: Tensors, meta: Meta, digest: bool = True) -> bytes:
    """A state file with these tensors and metadata; ``tensor_sha256`` recomputed unless ``digest=False``."""
    meta = dict(meta)
    if digest and "tensor_sha256" in meta:
        meta["tensor_sha256"] = tensor_digest(tensors)
    return save(tensors, metadata=meta)
