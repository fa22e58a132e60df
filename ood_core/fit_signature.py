"""The fit signature that travels with a detector's partial fit statistics.

:meth:`~ood_core.api.Detector.fit_statistics` adds the entry :data:`FIT_SIGNATURE_KEY`: the class, hyperparameters
and pass the statistics belong to, as UTF-8 JSON bytes in a uint8 tensor (so that it is safetensors-safe).
:meth:`~ood_core.api.Detector.merge_fit_statistics` decodes it and refuses statistics of another class,
hyperparameters or pass (:func:`check_fit_signature`). :mod:`ood_core.api` re-exports every name.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

#: the statistics entry naming the class, hyperparameters and pass (UTF-8 JSON in a uint8 tensor)
FIT_SIGNATURE_KEY = "fit_signature"
#: longest signature accepted by :func:`decode_fit_signature`
MAX_SIGNATURE_BYTES = 1 << 16


def _is_statistics_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable() and name != FIT_SIGNATURE_KEY


def encode_fit_signature(signature: dict[str, Any]) -> Tensor:
    """The signature as UTF-8 JSON bytes in a uint8 tensor (so it travels with the statistics)."""
    data = json.dumps(signature, sort_keys=True, allow_nan=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_fit_signature(t: Tensor) -> dict[str, Any]:
    """Inverse of :func:`encode_fit_signature`; ``ValueError`` for anything else."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > MAX_SIGNATURE_BYTES:
        raise ValueError(f"'{FIT_SIGNATURE_KEY}' must be a 1-D uint8 tensor of at most {MAX_SIGNATURE_BYTES} bytes")
    try:
        obj = json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"'{FIT_SIGNATURE_KEY}' is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"class", "hparams", "pass", "passes"}:
        raise ValueError(f"'{FIT_SIGNATURE_KEY}' must be an object with class, hparams, pass and passes")
    return obj


def check_fit_signature(own: dict[str, Any], other: dict[str, Any]) -> None:
    """Refuse to merge statistics of another class, hyperparameters or pass, saying which differs."""
    if other["class"] != own["class"]:
        raise ValueError(f"cannot merge fit statistics of {other['class']!r} into a {own['class']!r} fit")
    if other["hparams"] != own["hparams"]:
        raise ValueError(
            f"cannot merge {own['class']} fit statistics with other hyperparameters: {other['hparams']} "
            f"instead of {own['hparams']}"
        )
    if other["pass"] != own["pass"] or other["passes"] != own["passes"]:
        raise ValueError(
            f"cannot merge {own['class']} fit statistics of pass {other['pass']} (of {other['passes']}) into "
            f"pass {own['pass']} (of {own['passes']})"
        )
