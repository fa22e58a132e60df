"""NAC-UE: neuron activation coverage of the ID data, from gradient-weighted neuron states.

Liu, Qin: "Neuron Activation Coverage: Rethinking Out-of-distribution Detection and Generalization", ICLR 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Self

import torch
from torch import Tensor, nn

from ood_core.api import Detector, InvalidStateError, TensorSpec

#: smallest / largest neuron state before binning (the geometric bins are dense near 0 and 1)
_EPS = 1e-6
PerLayer = int | float | Sequence[int] | Sequence[float]


def default_feature_reduce(z: Tensor) -> Tensor:
    """A layer output as ``B x N`` neurons: ``B x N`` as is, ``B x C x H x W`` averaged over space, else flattened."""
    if z.dim() == 2:
        return z
    if z.dim() == 4:
        return z.mean(dim=(2, 3))
    return z.flatten(start_dim=1)


def geometric_bins(states: Tensor, m: int) -> Tensor:
    r"""Bin index in ``0..m-1`` of neuron states in (0, 1), clamped to :math:`[10^{-6}, 1 - 10^{-6}]`: edges
    :math:`10^{-6} = e_0 < \dots < e_{\lfloor m/2 \rfloor} = 0.5` spaced geometrically, mirrored above 0.5
    (:math:`1 - e_k`); a state in :math:`(e_{i}, e_{i+1}]` falls in bin :math:`i`."""
    half = m // 2
    left = torch.logspace(math.log10(_EPS), math.log10(0.5), half + 1, dtype=states.dtype, device=states.device)
    edges = torch.cat([left, (1.0 - left.flip(0))[1:]])
    index = torch.bucketize(states.clamp(_EPS, 1 - _EPS), edges, right=False) - 1
    return index.clamp(0, m - 1)


def _per_layer(name: str, value: Any, layers: int, cast: Callable[[Any], Any]) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            raise ValueError(f"{name} has {len(value)} values for {layers} layers")
        return [cast(v) for v in value]
    return [cast(value)] * layers


def _with_labels(loader: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches of a loader of ``(x, y)`` pairs or of plain input tensors (all ID, label 0)."""
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            yield batch[0], torch.as_tensor(batch[1])
        else:
            yield batch, torch.zeros(len(batch), dtype=torch.long)


class NACUE(Detector):
    r"""Outlier score = minus the neuron activation coverage, summed over layers:

    .. math:: s(x) = -\sum_{l} \frac{1}{N_l} \sum_{i=1}^{N_l} \min\left(1, \frac{O_{l,i}(b(\hat z_{l,i}(x)))}{O^*_l}
        \right), \qquad \hat z_l(x) = \operatorname{sigmoid}\left(\alpha_l\, r\!\left(z_l(x) \odot
        \frac{\partial D_{KL}(u \,\|\, \sigma(f(x)))}{\partial z_l(x)}\right)\right)

    where :math:`z_l(x)` is the output of ``layers[l]``, :math:`r` the ``feature_reduce`` (spatial mean of maps),
    :math:`u` the uniform distribution (the KL divergence is taken as the cross-entropy to :math:`u`, the same
    gradient), :math:`b` the geometric bin of a state (:func:`geometric_bins`, :math:`M_l` bins) and
    :math:`O_{l,i}(b)` the number of ID fit samples whose neuron :math:`i` of layer :math:`l` fell in bin
    :math:`b` (Liu & Qin 2024, Eq. 4-7: NAC-UE). Fitting counts the bins (a streaming histogram, mergeable:
    counts add); samples labelled < 0 are left out (pytorch-ood ignores labels and expects only ID data).

    Fitting and prediction run the model forward and backward (the gradient of the batch's summed loss w.r.t.
    the layer outputs; each sample's part depends on that sample only in eval mode, which both set, as
    pytorch-ood does): ``input_kind = "input"``. Layer outputs are captured with forward hooks, removed after
    each call. The state stores the counts, padded to ``L x N x M`` (``layer_dims`` holds each layer's
    :math:`N_l`).

    :param model: classifier returning ``B x C`` logits
    :param layers: modules of ``model`` whose outputs :math:`z_l` are used
    :param m_bins: bins :math:`M` per neuron (one value, or one per layer)
    :param alpha: sigmoid steepness :math:`\alpha` (one value, or one per layer)
    :param o_star: count :math:`O^*` giving full coverage (one value, or one per layer)
    :param feature_reduce: layer output -> ``B x N`` (default :func:`default_feature_reduce`; a custom one
        cannot be saved)
    :param device: where inputs (and the model) are moved before each call, if given
    """

    state_spec = {
        "counts": TensorSpec(("L", "N", "M"), torch.int64),
        "layer_dims": TensorSpec(("L",), torch.int64),
    }
    requires_fit = True
    input_kind = "input"
    external_modules = ("model", "layers")

    counts: Tensor
    layer_dims: Tensor

    def __init__(
        self,
        model: nn.Module | None,
        layers: Sequence[nn.Module] | None,
        m_bins: PerLayer = 50,
        alpha: PerLayer = 100.0,
        o_star: PerLayer = 50,
        feature_reduce: Callable[[Tensor], Tensor] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = None if layers is None else list(layers)
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be a non-empty list of modules")
        self.m_bins, self.alpha, self.o_star = m_bins, alpha, o_star
        checks: tuple[tuple[str, Any, int | None], ...] = (
            ("m_bins", m_bins, 1),
            ("alpha", alpha, None),
            ("o_star", o_star, 1),
        )
        for name, value, low in checks:
            values: list[Any] = list(value) if isinstance(value, (list, tuple)) else [value]
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
            if not all(math.isfinite(v) and (low is None or (v >= low and int(v) == v)) for v in values):
                raise ValueError(f"{name} must hold finite values" + (f", integers >= {low}" if low else ""))
        if self.layers is not None:
            self.per_layer(len(self.layers))  # lengths of per-layer lists
        self._custom_reduce = feature_reduce is not None
        self.feature_reduce = feature_reduce if feature_reduce is not None else default_feature_reduce
        self.run_device = None if device is None else torch.device(device)

    def hparams(self) -> dict[str, Any]:
        params: dict[str, Any] = {"m_bins": self.m_bins, "alpha": self.alpha, "o_star": self.o_star}
        if self._custom_reduce:  # not JSON: save_detector refuses it with a clear ValueError
            params["feature_reduce"] = self.feature_reduce
        return params

    def per_layer(self, layers: int) -> tuple[list[int], list[float], list[int]]:
        """``m_bins``, ``alpha`` and ``o_star`` expanded to one value per layer."""
        return (
            _per_layer("m_bins", self.m_bins, layers, int),
            _per_layer("alpha", self.alpha, layers, float),
            _per_layer("o_star", self.o_star, layers, int),
        )

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        detector = cls(modules.get("model"), modules.get("layers"), **hparams)
        if "layer_dims" in tensors:
            layers = int(tensors["layer_dims"].shape[0])
            if detector.layers is not None and len(detector.layers) != layers:
                raise ValueError(f"the state has {layers} layers, {len(detector.layers)} modules were given")
            detector.per_layer(layers)
        return detector

    def check_state(self) -> None:
        """Counts >= 0, zero beyond each layer's neurons and bins; layer sizes >= 1."""
        super().check_state()
        dims = self.layer_dims
        if dims.numel() == 0 or bool((dims < 1).any()) or self.counts.shape[0] != dims.shape[0]:
            raise InvalidStateError("NACUE needs one layer_dims entry >= 1 per layer of 'counts'")
        if int(dims.max()) != self.counts.shape[1] or bool((self.counts < 0).any()):
            raise InvalidStateError("NACUE 'counts' must be >= 0, as wide as the widest layer")
        bins, _, _ = self.per_layer(int(dims.shape[0]))
        if max(bins) != self.counts.shape[2]:
            raise InvalidStateError(f"NACUE 'counts' has {self.counts.shape[2]} bins, m_bins gives {max(bins)}")
        for i, (n, m) in enumerate(zip(dims.tolist(), bins, strict=True)):
            if self.counts[i, n:].any() or self.counts[i, :, m:].any():
                raise InvalidStateError(f"NACUE layer {i}: counts beyond its {n} neurons and {m} bins are not zero")

    # ------------------------------------------------------------------ the neuron states
    def neuron_states(self, x: Tensor) -> list[Tensor]:
        r"""Per layer, :math:`\hat z_l(x)` (``B x N_l``) of inputs ``x``: one forward with hooks on ``layers``, one
        backward of the cross-entropy to the uniform distribution, summed over the batch."""
        model = self._require("model")
        layers = self._require("layers")
        if self.run_device is not None:
            x = x.to(self.run_device)
            if isinstance(model, nn.Module):
                model.to(self.run_device)
        if isinstance(model, nn.Module):
            model.eval()
        captured: list[Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in layers]  # type: ignore[attr-defined]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x_in = x.detach().clone().requires_grad_(True)
                logits = model(x_in)
                if len(captured) != len(layers):  # type: ignore[arg-type]
                    raise ValueError(f"NACUE captured {len(captured)} layer outputs for {len(layers)} layers")  # type: ignore[arg-type]
                loss = -logits.log_softmax(dim=1).mean(dim=1).sum()
                grads = torch.autograd.grad(loss, captured)
        finally:
            for hook in hooks:
                hook.remove()
        _, alpha, _ = self.per_layer(len(captured))
        return [
            torch.sigmoid(a * self.feature_reduce((z * g).detach()).float())
            for a, z, g in zip(alpha, captured, grads, strict=True)
        ]

    # ------------------------------------------------------------------ fitting (streaming histogram, mergeable)
    def _extract(self, x: Tensor) -> Tensor:
        return x  # the inputs themselves: the fit needs gradients, taken in _fit_batch

    def fit(self, data_loader: Iterable[Any], device: str | torch.device | None = None) -> Self:
        """Count the bins on a loader of ``(x, y)`` batches or plain input batches (all ID)."""
        return super().fit(_with_labels(data_loader), device)

    def partial_fit(self, data_loader: Iterable[Any], device: str | torch.device | None = None) -> Self:
        return super().partial_fit(_with_labels(data_loader), device)

    def _begin_fit(self) -> None:
        self._counts: list[Tensor] = []

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        keep = torch.as_tensor(y).reshape(-1).to(z.device) >= 0
        x = z if bool(keep.all()) else z[keep]
        if x.shape[0] == 0:
            return
        states = self.neuron_states(x)
        bins, _, _ = self.per_layer(len(states))
        if not self._counts:
            self._counts = [
                torch.zeros(s.shape[1], m, dtype=torch.int64, device=s.device)
                for s, m in zip(states, bins, strict=True)
            ]
        if [c.shape[0] for c in self._counts] != [s.shape[1] for s in states]:
            raise ValueError("NACUE: the layers' numbers of neurons changed during the fit")
        for counts, s, m in zip(self._counts, states, bins, strict=True):
            index = geometric_bins(s, m) + torch.arange(s.shape[1], device=s.device) * m
            counts += torch.bincount(index.flatten(), minlength=counts.numel()).reshape(counts.shape).to(counts.device)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Per layer the bin counts ``layer<i>.counts`` (``N_i x M_i``, int64)."""
        return {f"layer{i}.counts": c for i, c in enumerate(self._counts)}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        names = [f"layer{i}.counts" for i in range(len(stats))]
        if set(stats) != set(names) or any(stats[n].dtype != torch.int64 or stats[n].dim() != 2 for n in names):
            raise ValueError(f"NACUE statistics must be int64 'layer<i>.counts' (N x M), got {sorted(stats)}")
        bins, _, _ = self.per_layer(len(names))
        if [int(stats[n].shape[1]) for n in names] != bins or any(bool((stats[n] < 0).any()) for n in names):
            raise ValueError(f"NACUE statistics must hold counts >= 0 with {bins} bins per layer")
        if not self._counts:
            self._counts = [stats[n].to(self.device, copy=True) for n in names]
            return
        if [c.shape for c in self._counts] != [stats[n].shape for n in names]:
            raise ValueError("NACUE statistics of other layer sizes")
        for c, n in zip(self._counts, names, strict=True):
            c += stats[n].to(c.device)

    def _finish_fit(self) -> None:
        counts, self._counts = self._counts, []
        if not counts:
            raise ValueError("NACUE: no ID samples (label >= 0) to fit on")
        widths = [c.shape[0] for c in counts]
        padded = torch.zeros(len(counts), max(widths), max(c.shape[1] for c in counts), dtype=torch.int64)
        for i, c in enumerate(counts):
            padded[i, : c.shape[0], : c.shape[1]] = c.cpu()
        device = counts[0].device
        self.counts = padded.to(device)
        self.layer_dims = torch.tensor(widths, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ prediction
    def predict(self, x: Tensor) -> Tensor:
        """:param x: inputs (``B x ...``), passed forward and backward through the model; returns ``B`` scores"""
        self._check_fitted()
        states = self.neuron_states(x)
        layers = int(self.layer_dims.shape[0])
        if len(states) != layers:
            raise ValueError(f"NACUE was fitted on {layers} layers, got {len(states)}")
        bins, _, o_star = self.per_layer(layers)
        coverage = torch.zeros(x.shape[0], dtype=torch.float32, device=states[0].device)
        for i, s in enumerate(states):
            n = int(self.layer_dims[i])
            if s.shape[1] != n:
                raise ValueError(f"NACUE layer {i} has {s.shape[1]} neurons, the fit had {n}")
            counts = self.counts[i, :n, : bins[i]].to(s.device)
            hits = counts.gather(1, geometric_bins(s, bins[i]).T).T.float()
            coverage += (hits / float(o_star[i])).clamp(max=1.0).mean(dim=1)
        return -coverage
