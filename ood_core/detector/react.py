"""ReAct: rectified activations.

Sun, Guo, Li: "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from ood_core.api import TensorSpec, known_mask
from ood_core.detector.ash import ActivationShapingDetector, check_percentile


class StreamingSample:
    """A uniform random sample, without replacement, of at most ``capacity`` values of a stream.

    Every value gets a random key; the sample is the ``capacity`` values with the smallest keys, kept with
    memory O(capacity + batch) however long the stream. While the stream has at most ``capacity`` values
    the sample is all of them and :meth:`quantile` is exact; beyond, it is the quantile of a uniform
    sample (for the default 2**22 values, a standard error of about 1.5e-4 in probability).
    Values are kept in float32 on the device of the first batch, with float32 keys from a generator seeded
    there (reproducible fits; key ties, which do not depend on the values, are broken by position). The
    default seed is deliberately not 0: keys drawn from the same stream as the data would correlate with it.
    """

    def __init__(self, capacity: int = 2**22, seed: int = 0x5EED) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._device = torch.device("cpu")
        self._values: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._size = 0
        self._key_limit = math.inf  # keys at or above it can no longer enter the sample
        self.seen = 0

    def add(self, values: Tensor) -> None:
        """Add all elements of ``values`` (any shape) to the stream."""
        if self._generator is None:
            self._device = values.device
            self._generator = torch.Generator(device=self._device).manual_seed(self.seed)
        flat = values.detach().reshape(-1).to(self._device, torch.float32)
        self.seen += flat.numel()
        keys = torch.rand(flat.numel(), generator=self._generator, device=self._device, dtype=torch.float32)
        if math.isfinite(self._key_limit):
            keep = keys < self._key_limit
            flat, keys = flat[keep], keys[keep]
        self._values.append(flat)
        self._keys.append(keys)
        self._size += flat.numel()
        if self._size > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        if not self._values:
            return
        values, keys = torch.cat(self._values), torch.cat(self._keys)
        if values.numel() > self.capacity:
            smallest = torch.topk(keys, self.capacity, largest=False)
            values, keys = values[smallest.indices], smallest.values
            self._key_limit = float(keys.max())
        self._values, self._keys, self._size = [values], [keys], values.numel()

    @property
    def stored(self) -> int:
        """Number of values held now (at most ``2 * capacity`` plus one batch)."""
        return self._size

    def values(self) -> Tensor:
        """The sampled values (all values while at most ``capacity`` were added)."""
        self._compact()
        return self._values[0] if self._values else torch.empty(0)

    def quantile(self, q: float) -> float:
        """Quantile ``q`` in [0, 1] with linear interpolation (as ``numpy.percentile``'s default)."""
        ordered = torch.sort(self.values().double()).values
        if ordered.numel() == 0:
            raise ValueError("no values to take a quantile of")
        pos = check_percentile(q, "q") * (ordered.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return float(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))


class ReAct(ActivationShapingDetector):
    r"""Clip the activations at a threshold :math:`c`, :math:`\bar h = \min(h, c)`, then score the head's
    logits (energy by default). The paper applies ReAct to the penultimate layer and sets :math:`c` to
    the 90th percentile of the ID activations.

    With ``threshold`` given the detector is ready at once and ``fit`` does nothing (pytorch-ood's
    behaviour; its default is ``threshold=1.0``). With ``threshold=None`` (our default, as in the paper)
    ``fit`` sets :math:`c` to the ``percentile`` of all activations of the ID fit samples (label >= 0),
    streamed through :class:`StreamingSample` (exact up to :attr:`activation_capacity` values).

    :param threshold: fixed clipping threshold, or ``None`` to fit it
    :param percentile: fraction in [0, 1] for the fitted threshold
    """

    requires_fit = True
    state_spec = {"threshold": TensorSpec(())}
    #: activations kept for the percentile; beyond it the threshold is estimated from a uniform sample
    activation_capacity: ClassVar[int] = 2**22

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        threshold: float | None = None,
        percentile: float = 0.9,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__(backbone, head, detector)
        self.percentile = check_percentile(percentile)
        self.fixed_threshold = None if threshold is None else float(threshold)
        if self.fixed_threshold is not None:
            if not math.isfinite(self.fixed_threshold):
                raise ValueError(f"threshold must be finite, got {threshold!r}")
            self.threshold = torch.tensor(self.fixed_threshold, dtype=torch.float32)
            self._mark_fitted()

    def hparams(self) -> dict[str, Any]:
        return {"threshold": self.fixed_threshold, "percentile": self.percentile, **self._score_hparams()}

    @staticmethod
    def rectify(x: Tensor, threshold: float | Tensor) -> Tensor:
        """``min(x, threshold)`` elementwise."""
        limit = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
        return torch.minimum(x, limit)

    def shape(self, activations: Tensor) -> Tensor:
        return ReAct.rectify(activations, self.threshold)

    # ------------------------------------------------------------------ fitting the threshold
    def fit(self, data_loader: Iterable[Any], device: str | torch.device | None = None) -> Self:
        """Fit the threshold on the backbone's activations of ID samples; no-op with a fixed threshold."""
        return self if self.fixed_threshold is not None else super().fit(data_loader, device)

    def fit_features(self, x: Any, y: Tensor, device: str | torch.device | None = None) -> Self:
        """Fit the threshold on activations ``x`` (``B x ...``) of ID samples; no-op with a fixed threshold."""
        return self if self.fixed_threshold is not None else super().fit_features(x, y, device)

    def _begin_fit(self) -> None:
        self._sample = StreamingSample(self.activation_capacity)
        self._fit_device = torch.device("cpu")

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"ReAct fit expects one label per sample, got {tuple(y.shape)} for {tuple(z.shape)}")
        self._sample.add(z[known_mask(y).to(z.device)])
        self._fit_device = z.device

    def _finish_fit(self) -> None:
        sample, self._sample = self._sample, StreamingSample(1)
        if sample.seen == 0:
            raise ValueError("ReAct: no ID activations to fit the threshold on")
        value = sample.quantile(self.percentile)
        self.threshold = torch.tensor(value, dtype=torch.float32, device=self._fit_device)
