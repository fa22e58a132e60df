"""A safetensors file of precomputed network outputs: ``logits`` (N x C), ``features`` (N x D) and/or
``feature_maps`` (N x C x H x W) with ``labels`` (N, integers; < 0: OOD), as :func:`write_outputs` writes them.

Nothing is decoded or run through the network: rows go straight to the detector. Rows are read in bounded chunks
through ``safetensors.safe_open`` slices (never the whole file). The optional metadata entry ``keys`` (a JSON list
of N strings) names the samples; give the keys of the images the outputs came from (``3/img_0042``) and the
calibration hold-out is the same as for those images; without it row ``i`` is named ``"i"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from service.fit.sources.base import OOD_LABEL, DataSourceError, FitSource, SourceIndex, SourceLimits

OUTPUT_NAMES = ("logits", "features", "feature_maps")
CHUNK_BYTES = 64 * 1024 * 1024
_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def write_outputs(
    path: str | Path, outputs: dict[str, Tensor], labels: Tensor, keys: Sequence[str] | None = None
) -> None:
    """Write outputs (any of :data:`OUTPUT_NAMES`) and labels as a precomputed fit source."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in outputs.items() if name in OUTPUT_NAMES}
    tensors["labels"] = labels.detach().cpu().to(torch.int64).contiguous()
    save_file(tensors, str(path), metadata={"keys": json.dumps(list(keys))} if keys is not None else None)


class OutputsSource(FitSource):
    """Precomputed outputs; :attr:`wanted` (set by the runner) is the output kind read."""

    kind = "outputs"

    def __init__(self, path: Path, labels: Sequence[str], limits: SourceLimits, skip_invalid: bool) -> None:
        super().__init__(str(path), labels, limits, skip_invalid)
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as fh:
                names = set(fh.keys())
                meta = fh.metadata() or {}
                shapes = {n: fh.get_slice(n).get_shape() for n in names}
                dtypes = {n: fh.get_slice(n).get_dtype() for n in names}
        except (OSError, SafetensorError) as exc:
            raise DataSourceError(f"{path}: not a readable safetensors file: {exc}") from exc
        self.outputs = tuple(n for n in OUTPUT_NAMES if n in names)
        if "labels" not in names or not self.outputs:
            raise DataSourceError(f"{path}: needs a 'labels' tensor and at least one of {', '.join(OUTPUT_NAMES)}")
        self.rows = shapes["labels"][0] if len(shapes["labels"]) == 1 else -1
        if self.rows < 0 or dtypes["labels"] not in ("I8", "I16", "I32", "I64", "U8"):
            raise DataSourceError(f"{path}: 'labels' must be a 1-D integer tensor")
        for name in self.outputs:
            if not shapes[name] or shapes[name][0] != self.rows:
                raise DataSourceError(f"{path}: '{name}' has {shapes[name][:1]} rows, 'labels' {self.rows}")
        self.shapes = shapes
        self.keys = self._keys(meta)
        self.wanted = self.outputs[0]

    def use_output(self, kind: str, dim: int) -> None:
        if kind not in self.outputs:
            raise DataSourceError(
                f"{self.path}: the detector consumes '{kind}'; the file holds {', '.join(self.outputs)}"
            )
        shape = self.shapes[kind]
        if len(shape) < 2 or shape[1] != dim:
            raise DataSourceError(f"{self.path}: '{kind}' has shape {shape}; the model gives {dim} per sample")
        self.wanted = kind

    def _keys(self, meta: dict[str, str]) -> list[str] | None:
        if "keys" not in meta:
            return None
        try:
            keys = json.loads(meta["keys"])
        except ValueError as exc:
            raise DataSourceError(f"{self.path}: metadata 'keys' is not JSON: {exc}") from exc
        if not isinstance(keys, list) or len(keys) != self.rows or not all(isinstance(k, str) for k in keys):
            raise DataSourceError(f"{self.path}: metadata 'keys' must be a list of {self.rows} strings")
        return keys

    def scan(self, rank: int = 0, world: int = 1) -> SourceIndex:
        with safe_open(str(self.path), framework="pt") as fh:
            labels = fh.get_tensor("labels").to(torch.int64)[rank::world]
        too_big = torch.nonzero(labels >= len(self.labels)).flatten()
        if too_big.numel():
            row = rank + int(too_big[0]) * world
            raise DataSourceError(
                f"{self.path}: row {row}: label {int(labels[too_big[0]])} but the model has {len(self.labels)} classes"
            )
        labels = torch.where(labels < 0, torch.full_like(labels, OOD_LABEL), labels)
        rows = range(rank, self.rows, world)
        keys = [self.keys[r] for r in rows] if self.keys is not None else [str(r) for r in rows]
        if not keys:
            raise DataSourceError(f"{self.path}: no rows")
        return SourceIndex(keys, labels, rank=rank, world=world)

    def read(self, index: SourceIndex, ordinals: Sequence[int]) -> Iterator[tuple[int, bytes | dict[str, Tensor]]]:
        name = self.wanted
        shape = self.shapes[name]
        row_bytes = 4 * max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 4
        span = max(1, CHUNK_BYTES // row_bytes)
        rows = [index.rank + o * index.world for o in ordinals]
        with safe_open(str(self.path), framework="pt") as fh:
            sliced = fh.get_slice(name)
            start = 0
            while start < len(rows):
                end = start
                while end < len(rows) and rows[end] - rows[start] < span:
                    end += 1
                chunk = sliced[rows[start] : rows[end - 1] + 1].to(torch.float32)
                for i in range(start, end):
                    yield ordinals[i], {name: chunk[rows[i] - rows[start]].clone()}
                start = end
