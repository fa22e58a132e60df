"""Base of the detectors that score penultimate-layer features with the help of the classification head.

:class:`HeadFeaturesDetector` holds what :class:`~ood_core.detector.fDBD`, :class:`~ood_core.detector.NCI`,
:class:`~ood_core.detector.LTS`, :class:`~ood_core.detector.NNGuide` and :class:`~ood_core.detector.PNML` share:
pytorch-ood 0.4.0's ``encoder`` (inputs -> ``B x D`` features) and ``head`` (features -> logits) arguments, kept
out of the module tree and out of saved states, ``input_kind = "features"`` and the head's logits.
:func:`linear_weights` reads ``W`` and ``b`` of a linear head for the detectors whose formula uses them
(fDBD's decision boundaries, NCI's class vectors). This module holds no formula.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from ood_core.api import Detector, TensorSpec, known_mask


def linear_weights(head: Any, owner: str) -> tuple[Tensor, Tensor]:
    """Detached float32 copies of the weight (``C x D``) and bias (``C``, zeros without one) of a linear head.

    ``head`` is an ``nn.Linear``, or a module whose only layer with parameters is one ``nn.Linear`` (for example
    the service's chain ``[fc]``, or ``nn.Sequential(nn.Flatten(), fc)``). Anything else raises ``ValueError``:
    ``owner``'s formula needs the class weight vectors of a linear classifier.
    """
    layers = (
        [m for m in head.modules() if any(True for _ in m.parameters(recurse=False))]
        if isinstance(head, nn.Module)
        else []
    )
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
        raise ValueError(f"{owner} needs a linear head (an nn.Linear, possibly inside a parameter-free wrapper)")
    linear = layers[0]
    w = linear.weight.detach().to(torch.float32).clone()
    b = torch.zeros(w.shape[0], device=w.device) if linear.bias is None else linear.bias.detach().float().clone()
    return w, b


def id_rows(z: Tensor, y: Tensor | None) -> Tensor:
    """Rows of ``z`` (``N x ...``) with label >= 0; every row when ``y`` is ``None`` (pytorch-ood's
    ``fit_features(z)`` without labels)."""
    if y is None:
        return z
    y = torch.as_tensor(y).reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"expected one label per sample, got {y.shape[0]} labels for {z.shape[0]} samples")
    keep = known_mask(y).to(z.device)
    return z if bool(keep.all()) else z[keep]


class HeadFeaturesDetector(Detector):
    """A detector on ``B x D`` penultimate features that may use the head mapping them to logits.

    :param encoder: network mapping inputs to ``B x D`` features (may be ``None`` for the ``*_features``
        methods); ``predict(x)`` and ``fit(loader)`` run it
    :param head: maps features to ``B x C`` logits
    """

    input_kind = "features"
    external_modules = ("encoder", "head")

    def __init__(self, encoder: Callable[[Tensor], Tensor] | None, head: Callable[[Tensor], Tensor] | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        nets = {name: modules.get(name) for name in cls.external_modules}
        return cls(**nets, **hparams)

    def _extract(self, x: Tensor) -> Tensor:
        return self._require("encoder")(x)

    def fit_features(self, x: Any, y: Tensor | None = None, device: str | torch.device | None = None) -> Self:
        """Fit on ``N x D`` features; ``y`` (labels, < 0 = OOD and ignored) may be left out, as in pytorch-ood,
        when every sample is in-distribution."""
        if y is None:
            y = torch.zeros(len(x), dtype=torch.long, device=x.device if isinstance(x, Tensor) else None)
        return super().fit_features(x, y, device)

    def logits(self, z: Tensor) -> Tensor:
        """The head's logits of features ``z`` (no gradients)."""
        with torch.no_grad():
            return self._require("head")(z)

    @staticmethod
    def check_features(owner: str, z: Tensor, dim: int | None = None) -> Tensor:
        """``z`` as ``B x D`` features; ``ValueError`` for another shape (or another ``D`` than ``dim``)."""
        if z.dim() != 2 or (dim is not None and z.shape[1] != dim):
            want = "B x D" if dim is None else f"B x {dim}"
            raise ValueError(f"{owner} expects {want} features, got shape {tuple(z.shape)}")
        return z


class LinearHeadMeanDetector(HeadFeaturesDetector):
    """A :class:`HeadFeaturesDetector` whose formula uses the weights ``w`` (``C x D``) and bias ``b`` of a linear
    head, copied when the detector is built and saved with the state, and the mean ID feature, fitted from a
    streamed float64 sum (mergeable: sums and counts add). Subclasses name the mean's buffer.

    Samples labelled < 0 are left out of the mean; ``fit_features(z)`` without labels takes every sample.
    """

    requires_fit = True
    #: name of the buffer holding the mean ID feature (``D``, float32)
    mean_name: ClassVar[str] = "mean"
    state_spec: ClassVar[dict[str, TensorSpec]] = {"w": TensorSpec(("C", "D")), "b": TensorSpec(("C",))}

    w: Tensor
    b: Tensor

    def __init__(self, encoder: Callable[[Tensor], Tensor] | None, head: Any) -> None:
        super().__init__(encoder, head)
        if head is not None:
            self.w, self.b = linear_weights(head, type(self).__name__)

    @property
    def feature_dim(self) -> int | None:
        return int(self.w.shape[1]) if self.w.dim() == 2 and self.w.numel() else None

    @property
    def num_classes(self) -> int | None:
        return int(self.w.shape[0]) if self.w.dim() == 2 and self.w.numel() else None

    def features(self, z: Tensor) -> Tensor:
        """``z`` checked as ``B x D`` features for ``w``, on the state's device, float32."""
        return self.check_features(type(self).__name__, self._to_device(z.detach()), self.w.shape[1]).float()

    def _begin_fit(self) -> None:
        if self.w.numel() == 0:
            raise ValueError(f"{type(self).__name__} needs the head's weights: build it with head=...")
        self._sum = torch.zeros(self.w.shape[1], dtype=torch.float64, device=self.w.device)
        self._count = torch.zeros((), dtype=torch.float64, device=self.w.device)

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        rows = id_rows(self.check_features(type(self).__name__, z.detach(), self.w.shape[1]), y)
        self._sum += rows.to(torch.float64).sum(0).to(self._sum.device)
        self._count += rows.shape[0]

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``sum`` (``D``, float64) and ``count`` of the ID features so far."""
        return {"sum": self._sum, "count": self._count}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        if set(stats) != {"sum", "count"} or stats["sum"].shape != self._sum.shape or stats["count"].numel() != 1:
            raise ValueError(
                f"{type(self).__name__} statistics must be 'sum' ({self._sum.shape[0]}) and 'count', got "
                f"{ {k: tuple(v.shape) for k, v in stats.items()} }"
            )
        self._sum += stats["sum"].to(self._sum.device, torch.float64)
        self._count += stats["count"].to(self._count.device, torch.float64).reshape(())

    def _finish_fit(self) -> None:
        if float(self._count) == 0:
            raise ValueError(f"{type(self).__name__}: no ID samples (label >= 0) to fit on")
        setattr(self, self.mean_name, (self._sum / self._count).to(torch.float32))
        self._begin_fit()
