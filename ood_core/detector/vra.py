"""VRA: variational rectified activation.

Xu, Lian, Liu, Tao: "VRA: Variational Rectified Activation for Out-of-distribution Detection", NeurIPS 2023
(arXiv:2302.11716; code: github.com/zeroQiaoba/VRA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ood_core.api import InvalidStateError, TensorSpec, known_mask
from ood_core.detector.ash import ActivationShapingDetector, check_percentile

#: columns sorted at a time when taking the per-element quantiles (bounds the fit's working memory)
QUANTILE_CHUNK_ELEMENTS = 1 << 24


class RowSample:
    """A uniform random sample, without replacement, of at most ``capacity`` rows of a stream of batches.

    Every row gets a random key (a seeded generator); the sample is the ``capacity`` rows with the smallest
    keys, so two samples merge by taking the smallest keys of their union. While the stream has at most
    ``capacity`` rows, the sample is all of them (exact quantiles). Rows are float32; keys float64.
    """

    def __init__(self, capacity: int, seed: int = 0x5EED) -> None:
        self.capacity = max(1, int(capacity))
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.rows: list[Tensor] = []
        self.keys: list[Tensor] = []
        self.size = 0

    def add(self, rows: Tensor, keys: Tensor | None = None) -> None:
        """Add ``N x M`` rows (with their keys when merging another sample)."""
        if keys is None:
            if self._generator is None:
                self._generator = torch.Generator(device=rows.device).manual_seed(self.seed)
            keys = torch.rand(rows.shape[0], generator=self._generator, device=rows.device, dtype=torch.float64)
        if self.rows and rows.shape[1] != self.rows[0].shape[1]:
            raise ValueError(
                f"VRA: batch has {rows.shape[1]} activations per sample, earlier ones {self.rows[0].shape[1]}"
            )
        self.rows.append(rows.to(torch.float32))
        self.keys.append(keys.to(rows.device, torch.float64))
        self.size += rows.shape[0]
        if self.size > 2 * self.capacity:
            self.compact()

    def compact(self) -> None:
        if not self.rows:
            return
        rows, keys = torch.cat(self.rows), torch.cat(self.keys)
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys, self.size = [rows], [keys], rows.shape[0]


def column_quantiles(rows: Tensor, q: float) -> Tensor:
    """Quantile ``q`` of every column of ``N x M`` rows, linear interpolation (``numpy.quantile``'s default),
    interpolated in float64, in chunks of columns."""
    n, m = rows.shape
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    out = torch.empty(m, dtype=torch.float64, device=rows.device)
    step = max(1, QUANTILE_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, m, step):
        ordered = torch.sort(rows[:, start : start + step], dim=0).values.to(torch.float64)
        out[start : start + step] = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
    return out


class VRA(ActivationShapingDetector):
    r"""Clip every activation between its lower and upper percentile over the ID fit data, then score the
    head's logits (energy by default):

    .. math:: \bar h_j = \min(\max(h_j, \alpha_j), \beta_j), \qquad s(x) = \mathrm{detector}(\mathrm{head}(\bar h))

    :math:`\alpha_j` and :math:`\beta_j` are the ``lower_percentile`` and ``upper_percentile`` quantiles of
    element :math:`j` (every channel and position of the ``C x H x W`` map) over the ID samples (labels >= 0).
    This is pytorch-ood 0.4.0's VRA, a two-sided ReAct; the paper's operator (Xu et al. 2023) also sets the
    activations below :math:`\alpha` to 0 and amplifies those in between by an offset :math:`\gamma`.

    Fit: the ID maps are kept while they number at most :attr:`max_fit_elements` activations in all (exact
    quantiles, as pytorch-ood, which keeps them all); beyond, a uniform random sample of that many maps
    (:class:`RowSample`, seeded; up to twice the budget plus one batch is held while fitting). Shards merge
    by keeping the maps with the smallest random keys: exactly one stream's result while under the budget.
    State: ``lower`` and ``upper``, ``C x S`` float32 (``S = H W``, 1 for ``B x D`` features).

    :param backbone: first part of the network, outputs ``B x C x H x W`` feature maps (or ``B x D`` features)
    :param head: rest of the network, maps the clipped activations to logits
    :param lower_percentile: fraction in [0, 1] for the lower thresholds
    :param upper_percentile: fraction in [0, 1] for the upper thresholds, at least ``lower_percentile``
    :param detector: maps logits to scores: a callable or a name of
        :data:`ood_core.detector.scores.SCORE_FUNCTION_NAMES`; default ``EnergyBased.score``
    """

    requires_fit = True
    supports_segmentation = False
    state_spec = {"lower": TensorSpec(("D", "S")), "upper": TensorSpec(("D", "S"))}
    #: activations (maps x elements per map) kept for the quantiles; beyond it a uniform sample of maps
    max_fit_elements: ClassVar[int] = 1 << 27
    #: pytorch-ood's search space (the OpenOOD sweep, as fractions)
    hyperparameter_space: ClassVar[dict[str, list[float]]] = {
        "upper_percentile": [0.85, 0.90, 0.95, 0.99],
        "lower_percentile": [0.01, 0.05, 0.10, 0.15],
    }

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor] | None,
        head: Callable[[Tensor], Tensor] | None,
        lower_percentile: float = 0.01,
        upper_percentile: float = 0.99,
        detector: Callable[..., Tensor] | str | None = None,
    ) -> None:
        super().__init__(backbone, head, detector)
        self.lower_percentile = check_percentile(lower_percentile, "lower_percentile")
        self.upper_percentile = check_percentile(upper_percentile, "upper_percentile")
        if self.lower_percentile > self.upper_percentile:
            raise ValueError("lower_percentile must not exceed upper_percentile")

    def hparams(self) -> dict[str, Any]:
        return {
            "lower_percentile": self.lower_percentile,
            "upper_percentile": self.upper_percentile,
            **self._score_hparams(),
        }

    @property
    def feature_dim(self) -> int | None:
        return int(self.lower.shape[0]) if self.lower.dim() == 2 and self.lower.numel() else None

    def check_state(self) -> None:
        """Finite thresholds with ``lower <= upper`` everywhere."""
        super().check_state()
        if bool((self.lower > self.upper).any()):
            raise InvalidStateError("VRA tensor 'lower' exceeds 'upper' somewhere")

    def shape(self, activations: Tensor) -> Tensor:
        flat = activations.reshape(activations.shape[0], self.lower.shape[0], -1)
        if flat.shape[2] != self.lower.shape[1]:
            raise ValueError(
                f"VRA was fitted on activations of {self.lower.shape[0]} x {self.lower.shape[1]} per sample, got "
                f"shape {tuple(activations.shape)}"
            )
        lower, upper = self._to(self.lower, flat), self._to(self.upper, flat)
        return torch.clamp(flat, min=lower, max=upper).reshape(activations.shape)

    @staticmethod
    def _to(t: Tensor, like: Tensor) -> Tensor:
        return t.to(like.device, like.dtype if like.is_floating_point() else torch.float32)

    # ------------------------------------------------------------------ fit (per-element quantiles)
    def _begin_fit(self) -> None:
        self._sample: RowSample | None = None
        self._layout: tuple[int, int] | None = None

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        y = torch.as_tensor(y).reshape(-1)
        if z.dim() < 2 or y.shape[0] != z.shape[0]:
            raise ValueError(
                f"VRA fit expects B x C x ... activations and B labels, got {tuple(z.shape)}, {tuple(y.shape)}"
            )
        layout = (int(z.shape[1]), math.prod(z.shape[2:]))
        if self._layout is None:
            self._layout = layout
            self._sample = RowSample(self.max_fit_elements // max(1, layout[0] * layout[1]))
        elif layout != self._layout:
            raise ValueError(f"VRA: batch activations {tuple(z.shape[1:])} differ from earlier ones")
        keep = known_mask(y).to(z.device)
        rows = z.detach()[keep].reshape(-1, layout[0] * layout[1])
        if self._sample is not None and rows.shape[0]:
            self._sample.add(rows)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """The sampled ID activations (``rows``, ``N x C S`` float32), their random ``keys`` (float64) and the
        ``layout`` ``(C, S)``; merging keeps the rows with the smallest keys of the union."""
        if self._sample is None or self._layout is None or self._sample.size == 0:
            return {}
        self._sample.compact()
        return {
            "rows": self._sample.rows[0],
            "keys": self._sample.keys[0],
            "layout": torch.tensor(self._layout, dtype=torch.int64),
        }

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        if set(stats) != {"rows", "keys", "layout"} or stats["layout"].shape != (2,):
            raise ValueError(f"VRA statistics must be 'rows', 'keys' and 'layout', got {sorted(stats)}")
        layout = (int(stats["layout"][0]), int(stats["layout"][1]))
        rows, keys = stats["rows"], stats["keys"]
        if rows.dim() != 2 or rows.shape[1] != layout[0] * layout[1] or keys.shape != (rows.shape[0],):
            raise ValueError(f"VRA statistics do not fit together: rows {tuple(rows.shape)}, keys {tuple(keys.shape)}")
        if self._layout is None or self._sample is None:
            self._layout = layout
            self._sample = RowSample(self.max_fit_elements // max(1, layout[0] * layout[1]))
        elif layout != self._layout:
            raise ValueError(f"VRA: statistics of activations {layout}, this fit has {self._layout}")
        device = self._sample.rows[0].device if self._sample.rows else self.device
        self._sample.add(rows.to(device), keys.to(device))

    def _finish_fit(self) -> None:
        sample, layout = self._sample, self._layout
        self._sample, self._layout = None, None
        if sample is None or layout is None or sample.size == 0:
            raise ValueError("VRA: no ID samples (label >= 0) to fit on")
        sample.compact()
        rows = sample.rows[0]
        self.lower = column_quantiles(rows, self.lower_percentile).to(torch.float32).reshape(layout)
        self.upper = column_quantiles(rows, self.upper_percentile).to(torch.float32).reshape(layout)
