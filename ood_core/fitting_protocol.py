"""The mergeable, resumable fit protocol of every detector (pytorch-ood#9), as the mixin :class:`MergeableFit`.

A fit is a sequence of :attr:`~MergeableFit.fit_passes` passes over the data. Each pass folds batches into
statistics (:meth:`~MergeableFit.partial_fit_features` / :meth:`~MergeableFit.partial_fit`), which can be exported
(:meth:`~MergeableFit.fit_statistics`, tagged with the :mod:`ood_core.fit_signature`), merged with another shard's
(:meth:`~MergeableFit.merge_fit_statistics`; :mod:`ood_core.distributed`) or checkpointed
(:mod:`ood_core.fit_checkpoint`), and is then finished (:meth:`~MergeableFit.finish_pass`). See ``docs/fitting.md``.

:class:`~ood_core.api.Detector` inherits the mixin; ``fit`` and ``fit_features`` are built on it there. Subclasses
implement the private hooks ``_begin_fit`` / ``_fit_batch`` / ``_finish_fit`` (per pass, reading ``self.fit_pass``)
and ``_fit_statistics`` / ``_merge_fit_statistics``; the default hooks buffer the batches and hand them to
``_fit_all`` at the end (statistics: the buffered outputs and labels, gathered).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import Tensor

from ood_core.fit_signature import (
    FIT_SIGNATURE_KEY,
    _is_statistics_name,
    check_fit_signature,
    decode_fit_signature,
    encode_fit_signature,
)


class MergeableFit:
    """The fit protocol of :class:`~ood_core.api.Detector` (a mixin: it keeps no state of its own beyond the
    attributes ``Detector.__init__`` sets, ``_fit_pass``, ``_fit_active`` and ``_is_fitted``)."""

    if TYPE_CHECKING:  # provided by Detector
        requires_fit: ClassVar[bool]
        _is_fitted: bool
        _fit_pass: int
        _fit_active: bool

        @property
        def device(self) -> torch.device: ...

        def hparams(self) -> dict[str, Any]: ...

        def check_state(self) -> None: ...

        def _mark_fitted(self) -> None: ...

        def _extract(self, x: Tensor) -> Tensor: ...

    def _outputs(self, data_loader: Iterable[Any], device: str | torch.device | None) -> Iterator[tuple[Any, Tensor]]:
        """``(network output, labels)`` per batch of the loader (inputs moved to ``device`` when given)."""
        for x, y in _batches(data_loader):
            if device is not None:
                x = x.to(device)
            with torch.no_grad():
                z = self._extract(x)
            yield z, y

    @property
    def fit_passes(self) -> int:
        """Passes over the data a fit needs: 0 for a detector that needs no fit, 1 for most, 2 where the
        second pass needs the first one's result (e.g. ViM's alpha, OpenMax's distances)."""
        return 1 if self.requires_fit else 0

    @property
    def fit_pass(self) -> int:
        """0-based pass now being accumulated (0 when no fit is in progress)."""
        return self._fit_pass

    def begin_fit(self) -> Self:
        """Start a fit: drop any partial statistics and begin pass 0. Called implicitly by the first
        ``partial_fit*`` (or ``fit_statistics`` / ``merge_fit_statistics``) when no fit is in progress.
        A detector that was fitted counts as unfitted until the new fit completes."""
        self._fit_pass = 0
        self._fit_active = self.fit_passes > 0
        if self._fit_active:
            self._is_fitted = False
            self._begin_fit()
        return self

    def partial_fit_features(self, z: Any, y: Tensor) -> Self:
        """Fold one batch of network outputs (per :attr:`input_kind`; a list of tensors for multi-layer
        detectors) and labels into the current pass's statistics. Labels < 0 are ignored where pytorch-ood
        ignores them."""
        self._ensure_fitting()
        if self._fit_active:
            y = torch.as_tensor(y)
            self._fit_batch(z, y.to(z.device) if isinstance(z, Tensor) else y)
        return self

    def partial_fit(self, data_loader: Iterable[Any], device: str | torch.device | None = None) -> Self:
        """:meth:`partial_fit_features` over a loader of ``(x, y)`` batches, passed through the network
        (moved to ``device`` first when given)."""
        self._ensure_fitting()
        if not self._fit_active:
            return self
        for z, y in self._outputs(data_loader, device):
            self.partial_fit_features(z, y)
        return self

    def fit_statistics(self) -> dict[str, Tensor]:
        """The current pass's partial statistics as contiguous CPU tensors (safetensors-safe names), with the
        entry :data:`FIT_SIGNATURE_KEY` naming the class, hyperparameters and pass they belong to. The tensors
        are copies: further batches and merges do not change them."""
        self._ensure_fitting()
        stats = self._fit_statistics() if self._fit_active else {}
        out: dict[str, Tensor] = {}
        for name, t in stats.items():
            if not _is_statistics_name(name):
                raise RuntimeError(f"{type(self).__name__} statistics name {name!r} is not safetensors-safe")
            out[name] = t.detach().to("cpu", copy=True).contiguous()  # a snapshot: later batches do not change it
        out[FIT_SIGNATURE_KEY] = encode_fit_signature(self.fit_signature())
        return out

    def merge_fit_statistics(self, stats: dict[str, Tensor]) -> Self:
        """Fold another shard's :meth:`fit_statistics` (same class, hyperparameters and pass) into this one.

        Order-independent up to float rounding: shards merged in any order finish to the same state
        (allclose) as one stream. Raises ``ValueError`` for statistics of another class, other
        hyperparameters or another pass, and for statistics that do not fit (other feature dimension)."""
        self._ensure_fitting()
        if FIT_SIGNATURE_KEY not in stats:
            raise ValueError(f"not fit statistics: the entry '{FIT_SIGNATURE_KEY}' is missing")
        check_fit_signature(self.fit_signature(), decode_fit_signature(stats[FIT_SIGNATURE_KEY]))
        rest = {name: t for name, t in stats.items() if name != FIT_SIGNATURE_KEY}
        if self._fit_active:
            self._merge_fit_statistics(rest)
        return self

    def finish_pass(self) -> bool:
        """Finish the current pass from the (merged) statistics.

        Returns True when the fit is complete (:meth:`check_state` ran, the detector is fitted) and False
        when another pass over the same data is needed (:attr:`fit_pass` advanced, its statistics empty;
        the detector keeps the earlier passes' results)."""
        if self.fit_passes == 0:
            return True
        self._ensure_fitting()
        self._finish_fit()
        if self._fit_pass + 1 < self.fit_passes:
            self._fit_pass += 1
            self._begin_fit()
            return False
        self._fit_active, self._fit_pass = False, 0
        self.check_state()
        self._mark_fitted()
        return True

    def fit_signature(self) -> dict[str, Any]:
        """What statistics must agree on to be merged: ``{"class", "hparams", "pass", "passes"}`` (``hparams``
        is ``None`` when they cannot be serialized, e.g. a custom scoring callable)."""
        try:
            hparams: Any = json.loads(json.dumps(self.hparams(), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError):
            hparams = None
        return {"class": type(self).__name__, "hparams": hparams, "pass": self._fit_pass, "passes": self.fit_passes}

    def _ensure_fitting(self) -> None:
        if not self._fit_active:
            self.begin_fit()

    def _clear_pass_statistics(self) -> None:
        """Empty the current pass's statistics, keeping the pass (used by :mod:`ood_core.distributed`)."""
        self._ensure_fitting()
        if self._fit_active:
            self._begin_fit()

    def _restart_pass(self, index: int) -> None:
        """Resume a fit at pass ``index`` with empty statistics (used by :mod:`ood_core.fit_checkpoint`)."""
        if not 0 <= index < max(1, self.fit_passes):
            raise ValueError(f"{type(self).__name__} has {self.fit_passes} fit passes, not a pass {index}")
        self._fit_pass, self._fit_active, self._is_fitted = index, self.fit_passes > 0, False
        if self._fit_active:
            self._begin_fit()

    def _fit_context(self) -> dict[str, Tensor]:
        """Results of earlier passes that a later pass needs and that are not state buffers (saved with a
        checkpoint). State buffers that are set are saved anyway."""
        return {}

    def _load_fit_context(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`_fit_context` (after :meth:`_restart_pass`)."""
        if tensors:
            raise ValueError(f"{type(self).__name__} has no fit context, got {sorted(tensors)}")

    # Default hooks: collect everything, then ``_fit_all``. Streaming detectors override the hooks.
    def _begin_fit(self) -> None:
        self._fit_buffer: list[tuple[Any, Tensor]] = []

    def _fit_batch(self, z: Any, y: Tensor) -> None:
        self._fit_buffer.append((z, y))

    def _finish_fit(self) -> None:
        items, self._fit_buffer = self._fit_buffer, []
        if not items:
            raise ValueError(f"{type(self).__name__}: no data to fit on")
        z, ys = _concat_items(items)
        self._fit_all(z, ys)

    def _fit_all(self, z: Any, y: Tensor) -> None:
        raise NotImplementedError

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Default: the buffered outputs and labels (``z`` or ``z.0``, ``z.1``, ... per layer, and ``y``)."""
        items = getattr(self, "_fit_buffer", None)
        if items is None:
            raise NotImplementedError(f"{type(self).__name__} does not export fit statistics")
        if not items:
            return {}
        z, ys = _concat_items(items)
        self._fit_buffer = [(z, ys)]  # concatenated once: later calls do not copy again
        if isinstance(z, Tensor):
            return {"z": z, "y": ys}
        return {"y": ys, **{f"z.{i}": layer for i, layer in enumerate(z)}}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        """Default: append the other shard's outputs and labels to the buffer (a gather)."""
        items = getattr(self, "_fit_buffer", None)
        if items is None:
            raise NotImplementedError(f"{type(self).__name__} does not merge fit statistics")
        if not stats:
            return
        layers = sorted((k for k in stats if k.startswith("z.")), key=lambda k: int(k[2:]))
        expected = {"y", "z"} if "z" in stats else {"y", *layers}
        if set(stats) != expected or (not layers and "z" not in stats):
            raise ValueError(
                f"{type(self).__name__} statistics must be 'z' (or 'z.0', ...) and 'y', got {sorted(stats)}"
            )
        device = _first_device(items[0][0]) if items else self.device
        if "z" in stats:
            z: Any = stats["z"].to(device)
        else:
            z = [stats[k].to(device) for k in layers]
        items.append((z, stats["y"].to(device)))


def _batches(loader: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("fit(loader) expects batches of (inputs, labels)")
        yield batch[0], torch.as_tensor(batch[1])


def _concat_items(items: list[tuple[Any, Tensor]]) -> tuple[Any, Tensor]:
    """Concatenate buffered ``(z, y)`` batches: one tensor, or one per layer for lists of tensors."""
    ys = torch.cat([y.reshape(-1).cpu() for _, y in items])
    if isinstance(items[0][0], Tensor):
        return (items[0][0] if len(items) == 1 else torch.cat([z for z, _ in items])), ys
    layers = list(zip(*[z for z, _ in items], strict=True))
    return [torch.cat(list(t)) for t in layers], ys


def _first_device(z: Any) -> torch.device:
    return z.device if isinstance(z, Tensor) else z[0].device
