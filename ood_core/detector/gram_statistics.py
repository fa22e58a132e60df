"""Gram vectors, their deviation from per-class bounds, and the two-pass mergeable fit of
:class:`~ood_core.detector.gram.Gram` (Sastry, Oore: "Detecting Out-of-Distribution Examples with
In-distribution Examples and Gram Matrices", ICML 2020).

:func:`gram_vectors` and :func:`deviation` are the formulas; :class:`GramFit` is the fit as a mixin of ``Gram``:
pass 0 folds per-class minima and maxima of the Gram vectors (with and without the held-out share), pass 1 the
held-out samples' deviations, both as statistics that merge across shards to exactly the state of one stream.
:mod:`ood_core.detector.gram` re-exports every name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Sequence

#: finite stand-in for +infinity in the running minima (fit statistics and checkpoints must be finite)
_BIG = torch.finfo(torch.float64).max
#: feature entries per sample read by the hold-out hash
_HASH_ENTRIES = 64


def gram_vectors(feature: Tensor, poles: Sequence[int]) -> Tensor:
    r"""Row sums of the :math:`p`-th order Gram matrices of a batch of feature maps, for every pole :math:`p`:

    .. math:: g_p = \operatorname{sign}(G_p \mathbf 1)\, |G_p \mathbf 1|^{1/p}, \qquad G_p = F^{p} (F^{p})^\top

    with :math:`F` the ``D x HW`` feature map of one sample (``B x D`` features count as ``HW = 1``) and
    :math:`F^p` taken entrywise. :math:`G_p \mathbf 1 = F^p (F^{p\top} \mathbf 1)` costs ``O(D·HW)``, not
    ``O(D²·HW)``. Computed in float64 (high poles overflow float32). Returns ``P x B x D``.
    """
    t = feature.detach().to(torch.float64).reshape(feature.shape[0], feature.shape[1], -1)
    out = []
    for p in poles:
        tp = t**p
        g = torch.bmm(tp, tp.sum(dim=1).unsqueeze(2)).squeeze(2)
        out.append(g.sign() * g.abs() ** (1.0 / p))
    return torch.stack(out)


def deviation(g: Tensor, mins: Tensor, maxs: Tensor) -> Tensor:
    r"""Relative out-of-bounds deviation summed over the last dimension:
    :math:`\sum_j \frac{\max(0, m_j - g_j)}{|m_j + 10^{-6}|} + \frac{\max(0, g_j - M_j)}{|M_j + 10^{-6}|}`."""
    low = torch.relu(mins - g) / (mins + 1e-6).abs()
    high = torch.relu(g - maxs) / (maxs + 1e-6).abs()
    return (low + high).sum(dim=-1)


class GramFit:
    """The fit hooks of :class:`~ood_core.detector.gram.Gram` (a mixin listed before ``Detector``): two passes,
    pass 0 the class bounds, pass 1 the expected deviations (see the class docstring of ``Gram``)."""

    if TYPE_CHECKING:  # provided by Gram and Detector
        validation_fraction: ClassVar[float]
        min_holdout_class_size: ClassVar[int]
        n_classes: int
        mins: Tensor
        maxs: Tensor
        layer_dims: Tensor
        layer_norm: Tensor
        _holdout: Tensor | None

        @property
        def device(self) -> torch.device: ...

        @property
        def fit_pass(self) -> int: ...

        def poles(self, layers: int) -> list[int]: ...

        def _to_device(self, x: Tensor) -> Tensor: ...

    @property
    def fit_passes(self) -> int:
        return 2

    def _held_out(self, first_layer: Tensor) -> Tensor:
        """Whether each sample is in the held-out share: a hash of (up to 64 of) its first layer's float32
        values, mixed to a fraction in [0, 1), below :attr:`validation_fraction`."""
        flat = first_layer.detach().reshape(first_layer.shape[0], -1).float()
        cols = torch.linspace(0, flat.shape[1] - 1, min(flat.shape[1], _HASH_ENTRIES), device=flat.device).long()
        bits = flat[:, cols].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        h = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
        for j in range(bits.shape[1]):
            h = (h * 1000003 + bits[:, j]) & 0xFFFFFFFF
        h = (h * 2654435761) & 0xFFFFFFFF
        return h.to(torch.float64) / 2.0**32 < self.validation_fraction

    def _id_batch(self, z: Any, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """The ID rows of a batch of per-layer outputs, labels checked to be ``0..C-1``."""
        if not isinstance(z, (list, tuple)) or not z:
            raise ValueError("Gram expects a non-empty list of per-layer feature maps")
        y = torch.as_tensor(y).reshape(-1).to(z[0].device)
        if any(layer.shape[0] != y.shape[0] for layer in z):
            raise ValueError(f"expected one label per sample ({y.shape[0]}) in every layer")
        if bool((y >= self.n_classes).any()):
            raise ValueError(f"labels must be < num_classes={self.n_classes} (or < 0 for OOD)")
        keep = y >= 0
        if bool(keep.all()):
            return list(z), y.long()
        return [layer[keep] for layer in z], y[keep].long()

    def _begin_fit(self) -> None:
        if self.fit_pass == 0:
            self._stats: dict[str, Tensor] = {}
        else:
            layers = int(self.layer_dims.shape[0])
            self._dev_sum = torch.zeros(layers, dtype=torch.float64, device=self.device)
            self._dev_count = torch.zeros(layers, dtype=torch.float64, device=self.device)

    def _empty_stats(self, widths: list[int], device: torch.device) -> dict[str, Tensor]:
        poles, c = len(self.poles(len(widths))), self.n_classes
        stats = {
            "train_count": torch.zeros(c, dtype=torch.float64, device=device),
            "total_count": torch.zeros(c, dtype=torch.float64, device=device),
        }
        for i, width in enumerate(widths):
            for part in ("train", "all"):
                stats[f"layer{i}.{part}_min"] = torch.full((poles, c, width), _BIG, dtype=torch.float64, device=device)
                stats[f"layer{i}.{part}_max"] = torch.full((poles, c, width), -_BIG, dtype=torch.float64, device=device)
        return stats

    def _fit_batch(self, z: Any, y: Tensor) -> None:
        maps, labels = self._id_batch(z, y)
        if labels.numel() == 0:
            return
        widths = [int(layer.shape[1]) for layer in maps]
        held = self._held_out(maps[0])
        poles = self.poles(len(maps))
        if self.fit_pass == 1:
            layers = int(self.layer_dims.shape[0])
            if widths != self.layer_dims.tolist():
                raise ValueError(f"got layers of widths {widths}, the first pass had {self.layer_dims.tolist()}")
            assert self._holdout is not None, "pass 1 needs the hold-out classes of pass 0"
            rows = held & self._holdout.to(labels.device)[labels]
            if not bool(rows.any()):
                return
            cls = labels[rows].to(self.device)
            for i in range(layers):
                g = gram_vectors(self._to_device(maps[i][rows]), poles)
                dev = deviation(g, self.mins[i][:, cls, : widths[i]], self.maxs[i][:, cls, : widths[i]]).sum(0)
                self._dev_sum[i] += dev.sum()
                self._dev_count[i] += dev.numel()
            return
        if not self._stats:
            self._stats = self._empty_stats(widths, maps[0].device)
        if len(widths) != sum(1 for k in self._stats if k.endswith(".all_min")):
            raise ValueError(f"got {len(widths)} layers, the fit started with another number")
        device = self._stats["train_count"].device
        labels, held = labels.to(device), held.to(device)
        self._stats["total_count"] += torch.bincount(labels, minlength=self.n_classes).double()
        self._stats["train_count"] += torch.bincount(labels[~held], minlength=self.n_classes).double()
        for i, layer in enumerate(maps):
            g = gram_vectors(layer.to(device), poles)
            if g.shape[2] != self._stats[f"layer{i}.all_min"].shape[2]:
                raise ValueError(f"layer {i} has {g.shape[2]} channels, the fit started with another width")
            for part, mask in (("all", None), ("train", ~held)):
                rows, cls = (g, labels) if mask is None else (g[:, mask], labels[mask])
                index = cls.reshape(1, -1, 1).expand(rows.shape[0], -1, rows.shape[2])
                for reduce, key in (("amin", "min"), ("amax", "max")):
                    acc = self._stats[f"layer{i}.{part}_{key}"]
                    acc.scatter_reduce_(1, index, rows, reduce=reduce, include_self=True)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Pass 0: per layer the per-class minima and maxima of the Gram vectors (``layer<i>.{train,all}_{min,max}``,
        ``P x C x D_i``; ``train`` without the held-out samples) and the per-class counts; pass 1: the sum and
        number of the held-out deviations per layer (``dev_sum``, ``dev_count``)."""
        if self.fit_pass == 1:
            return {"dev_sum": self._dev_sum, "dev_count": self._dev_count}
        return dict(self._stats)

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        if self.fit_pass == 1:
            shape = self._dev_sum.shape
            if set(stats) != {"dev_sum", "dev_count"} or any(t.shape != shape for t in stats.values()):
                raise ValueError(f"Gram pass 1 statistics must be 'dev_sum' and 'dev_count' of shape {tuple(shape)}")
            self._dev_sum += stats["dev_sum"].to(self._dev_sum.device, torch.float64)
            self._dev_count += stats["dev_count"].to(self._dev_count.device, torch.float64)
            return
        layers = sum(1 for k in stats if k.endswith(".all_min"))
        first = [stats.get(f"layer{i}.all_min") for i in range(layers)]
        if not layers or any(t is None or t.dim() != 3 for t in first):
            raise ValueError("Gram statistics must be named layer<i>.{train,all}_{min,max} (P x C x D_i) and *_count")
        expected = self._empty_stats([int(t.shape[2]) for t in first if t is not None], torch.device("cpu"))
        if set(stats) != set(expected) or any(stats[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"Gram statistics do not fit: expected {sorted(expected)} with matching shapes")
        if not self._stats:
            self._stats = {k: torch.as_tensor(v).to(self.device, torch.float64, copy=True) for k, v in stats.items()}
            return
        if set(self._stats) != set(stats) or any(self._stats[k].shape != stats[k].shape for k in stats):
            raise ValueError("Gram statistics of another number of layers or widths")
        for key, t in stats.items():
            acc, t = self._stats[key], t.to(self._stats[key].device, torch.float64)
            if key.endswith("_count"):
                acc += t
            elif key.endswith("_min"):
                torch.minimum(acc, t, out=acc)
            else:
                torch.maximum(acc, t, out=acc)

    def _finish_fit(self) -> None:
        if self.fit_pass == 1:
            mean = self._dev_sum / self._dev_count.clamp_min(1)
            self.layer_norm = torch.where((self._dev_count > 0) & (mean > 0), mean, torch.ones_like(mean))
            self._holdout = None
            return
        stats, self._stats = self._stats, {}
        if not stats:
            raise ValueError("Gram: no ID samples (label >= 0) to fit on")
        total, train = stats["total_count"], stats["train_count"]
        missing = torch.nonzero(total == 0).flatten().tolist()
        if missing:
            raise ValueError(f"Gram: no ID samples for class(es) {missing[:10]}")
        holdout = (total >= self.min_holdout_class_size) & (train > 0) & (train < total)
        layers = sum(1 for k in stats if k.endswith(".all_min"))
        widths = [int(stats[f"layer{i}.all_min"].shape[2]) for i in range(layers)]
        poles, m, device = stats["layer0.all_min"].shape[0], max(widths), total.device
        mins = torch.zeros(layers, poles, self.n_classes, m, dtype=torch.float64, device=device)
        maxs = torch.zeros_like(mins)
        pick = holdout.reshape(1, -1, 1)
        for i, width in enumerate(widths):
            mins[i, ..., :width] = torch.where(pick, stats[f"layer{i}.train_min"], stats[f"layer{i}.all_min"])
            maxs[i, ..., :width] = torch.where(pick, stats[f"layer{i}.train_max"], stats[f"layer{i}.all_max"])
        self.mins, self.maxs = mins, maxs
        self.layer_dims = torch.tensor(widths, dtype=torch.int64, device=device)
        self._holdout = holdout

    def _fit_context(self) -> dict[str, Tensor]:
        return {} if self.fit_pass == 0 or self._holdout is None else {"holdout": self._holdout.to(torch.uint8)}

    def _load_fit_context(self, tensors: dict[str, Tensor]) -> None:
        if self.fit_pass == 0:
            if tensors:
                raise ValueError(f"Gram pass 0 has no fit context, got {sorted(tensors)}")
            return
        holdout = tensors.get("holdout")
        if set(tensors) != {"holdout"} or holdout is None or tuple(holdout.shape) != (self.n_classes,):
            raise ValueError(f"Gram pass 1 needs the context 'holdout' ({self.n_classes} flags)")
        self._holdout = holdout.to(self.device).bool()
