"""Checkpoints of a running fit, to resume it after a kill (``--checkpoint-every N`` / ``--resume``).

Per rank (``<path>`` for one process, ``<path>.rank<r>-of-<w>`` under torchrun) two safetensors files, each written
atomically: the fit checkpoint itself (:func:`ood_core.fit_checkpoint.save_fit_checkpoint`: the detector's pass and
partial statistics, and what earlier passes found) and, next to it, ``<that>.masks-<token>`` with which of this
rank's samples the statistics already hold and which were skipped as undecodable (two bool tensors). The masks are
written first and the checkpoint names them with their SHA-256, so a kill at any moment leaves a checkpoint whose
masks are complete; older masks files are removed after each checkpoint. The checkpoint's metadata also holds a
fingerprint of the fit (model, detector, hyperparameters, share, seed, the source's description and this rank's
sample keys and labels, rank and world size), so a checkpoint is never resumed into another fit. A checkpoint is
written every N images of a rank and at the end of each pass, and every file is removed when the fit succeeds.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from ood_core.api import Detector
from ood_core.state import write_atomic
from service.errors import BadRequestError
from service.fit.dist import Ranks

META_KEY = "ood_fit"


def rank_path(path: Path, ranks: Ranks) -> Path:
    return path if not ranks.distributed else path.with_name(f"{path.name}.rank{ranks.rank}-of-{ranks.world}")


def fingerprint(parts: dict[str, Any], keys: list[str], labels: Tensor) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for key in keys:
        digest.update(key.encode() + b"\0")
    digest.update(labels.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Resumed:
    detector: Detector
    consumed: Tensor
    skipped: Tensor


class Checkpointer:
    """Writes this rank's checkpoint every ``every`` images (and on demand); loads it to resume."""

    def __init__(self, path: Path | None, every: int | None, ranks: Ranks, fit_id: str) -> None:
        self.path = rank_path(path, ranks) if path is not None else None
        self.every = every
        self.fit_id = fit_id
        self.since = 0
        self.written = 0

    def _masks_files(self) -> list[Path]:
        assert self.path is not None
        prefix = f"{self.path.name}.masks-"
        return [p for p in self.path.parent.iterdir() if p.name.startswith(prefix)] if self.path.parent.is_dir() else []

    def save(self, detector: Detector, consumed: Tensor, skipped: Tensor) -> None:
        if self.path is None:
            return
        from ood_core.fit_checkpoint import save_fit_checkpoint

        masks = save_tensors({"consumed": consumed.contiguous(), "skipped": skipped.contiguous()})
        masks_path = self.path.with_name(f"{self.path.name}.masks-{secrets.token_hex(6)}")
        write_atomic(masks_path, masks)
        meta = {"fit": self.fit_id, "masks": masks_path.name, "masks_sha256": hashlib.sha256(masks).hexdigest()}
        write_atomic(self.path, save_fit_checkpoint(detector, meta={META_KEY: json.dumps(meta)}))
        for old in self._masks_files():
            if old != masks_path:
                old.unlink(missing_ok=True)
        self.since = 0
        self.written += 1

    def after(self, images: int, detector: Detector, consumed: Tensor, skipped: Tensor) -> bool:
        """Count ``images`` just folded in; write a checkpoint when ``every`` have been since the last one."""
        self.since += images
        if self.every and self.since >= self.every:
            self.save(detector, consumed, skipped)
            return True
        return False

    def load(self, n: int, modules: dict[str, Any]) -> Resumed | None:
        """The checkpoint of this fit, or ``None`` when there is none; 400 when it belongs to another fit."""
        if self.path is None or not self.path.is_file():
            return None
        from ood_core.fit_checkpoint import load_fit_checkpoint

        try:
            detector, meta = load_fit_checkpoint(self.path, **modules)
            saved = json.loads(meta[META_KEY])
            masks = (self.path.parent / Path(saved["masks"]).name).read_bytes()
            if hashlib.sha256(masks).hexdigest() != saved["masks_sha256"]:
                raise ValueError("its masks file does not match")
            tensors = load_tensors(masks)
            consumed, skipped = tensors["consumed"], tensors["skipped"]
            if consumed.shape != (n,) or skipped.shape != (n,) or consumed.dtype != torch.bool:
                raise ValueError("its masks do not fit this rank's samples")
        except Exception as exc:  # any malformed checkpoint: say so, never resume from it
            raise BadRequestError(f"{self.path}: not a usable fit checkpoint: {exc}") from exc
        if saved.get("fit") != self.fit_id:
            raise BadRequestError(
                f"{self.path}: checkpoint of another fit (other data, detector, options or number of ranks); "
                "remove it or run without --resume"
            )
        return Resumed(detector, consumed, skipped)

    def remove(self) -> None:
        if self.path is not None:
            for masks in self._masks_files():
                masks.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
