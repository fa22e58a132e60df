"""Gram matrices of several layers' feature maps, compared with per-class bounds of the ID data.

Sastry, Oore: "Detecting Out-of-Distribution Examples with In-distribution Examples and Gram Matrices",
ICML 2020.

The detector (constructor, state, prediction) lives here; the Gram vectors, the deviation and the two-pass
mergeable fit (the mixin :class:`~ood_core.detector.gram_statistics.GramFit`) live in
:mod:`ood_core.detector.gram_statistics` and are re-exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec

# the formulas and the fit, re-exported (``X as X``: explicit re-exports)
from ood_core.detector.gram_statistics import _BIG as _BIG
from ood_core.detector.gram_statistics import _HASH_ENTRIES as _HASH_ENTRIES
from ood_core.detector.gram_statistics import GramFit as GramFit
from ood_core.detector.gram_statistics import deviation as deviation
from ood_core.detector.gram_statistics import gram_vectors as gram_vectors
from ood_core.detector.layer_chain import chained_outputs


class Gram(GramFit, Detector):
    r"""Outlier score = total deviation of the Gram matrices of several layers from the ID bounds of the predicted
    class, each layer normalized by its expected deviation:

    .. math:: \Delta(x) = \sum_l \frac{\delta_l(x)}{\mathbb E_{\text{val}}[\delta_l]}, \qquad
        \delta_l(x) = \sum_{p} \sum_j \frac{\max(0, m^{l,p}_{cj} - g^{l,p}_j)}{|m^{l,p}_{cj} + 10^{-6}|}
        + \frac{\max(0, g^{l,p}_j - M^{l,p}_{cj})}{|M^{l,p}_{cj} + 10^{-6}|}

    where :math:`g^{l,p}` are the row sums of the :math:`p`-th order Gram matrix of layer :math:`l`'s feature
    map (:func:`gram_vectors`), :math:`c = \arg\max` of the logits, and :math:`m^{l,p}_c, M^{l,p}_c` the entrywise
    minimum and maximum of :math:`g^{l,p}` over the ID fit samples of class :math:`c` (Sastry & Oore 2020).

    The expected deviation :math:`\mathbb E_{\text{val}}[\delta_l]` is the mean deviation, from the bounds of
    their own class, of a held-out share (:attr:`validation_fraction`, 10%) of the ID fit samples, left out of
    the bounds (1 where that mean is 0 or no sample is held out). As in pytorch-ood, classes with fewer than 10
    samples hold none out. pytorch-ood draws the held-out samples with ``torch.randperm``; here a sample is held
    out when a hash of its first layer's feature values falls in the lowest 10%, so that the fit is
    deterministic and mergeable: two passes (bounds, then expected deviations) whose statistics (minima,
    maxima, counts, sums) merge across shards to exactly the state of one stream.

    The layers are applied in turn (``feature_layers[0]`` to the input, each next one to the previous output),
    ``head`` maps the last output to ``B x C`` logits. :meth:`predict_features` takes the list of per-layer
    outputs (and runs ``head`` on the last); :meth:`predict_structured` also takes the logits (the service
    passes the served network's). Labels < 0 are ignored; labels must be ``0..num_classes-1``, each present.

    State layout: ``mins`` and ``maxs`` are ``L x P x C x M`` (layers x poles x classes x widest layer, zero
    padded beyond each layer's width ``layer_dims``), ``layer_norm`` (``L``) the expected deviations.

    :param head: maps the last layer's output to logits (may be ``None`` for :meth:`predict_structured`)
    :param feature_layers: consecutive layers whose outputs are the feature maps (may be ``None`` for the
        ``*_features`` methods)
    :param num_classes: number of classes :math:`C`
    :param num_poles_list: poles :math:`p` (positive integers); default :math:`1, \dots, L`
    """

    state_spec = {
        "mins": TensorSpec(("L", "P", "C", "M"), torch.float64),
        "maxs": TensorSpec(("L", "P", "C", "M"), torch.float64),
        "layer_dims": TensorSpec(("L",), torch.int64),
        "layer_norm": TensorSpec(("L",), torch.float64),
    }
    requires_fit = True
    input_kind = "multi_features"
    external_modules = ("head", "feature_layers")
    #: share of the ID fit samples held out (per class) to estimate the expected deviation
    validation_fraction: ClassVar[float] = 0.1
    #: classes with fewer ID samples hold none out
    min_holdout_class_size: ClassVar[int] = 10

    mins: Tensor
    maxs: Tensor
    layer_dims: Tensor
    layer_norm: Tensor

    def __init__(
        self,
        head: Callable[[Tensor], Tensor] | None,
        feature_layers: Sequence[Callable[[Tensor], Tensor]] | None,
        num_classes: int,
        num_poles_list: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.feature_layers = None if feature_layers is None else list(feature_layers)
        if self.feature_layers is not None and not self.feature_layers:
            raise ValueError("feature_layers must be a non-empty list of layers")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or int(num_classes) < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        self.n_classes = int(num_classes)
        poles = None if num_poles_list is None else list(num_poles_list)
        if poles is not None and (not poles or not all(isinstance(p, int) and p >= 1 for p in poles)):
            raise ValueError(f"num_poles_list must hold positive integers, got {num_poles_list}")
        self.num_poles_list = poles
        self._holdout: Tensor | None = None

    def hparams(self) -> dict[str, Any]:
        return {"num_classes": self.n_classes, "num_poles_list": self.num_poles_list}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        detector = cls(modules.get("head"), modules.get("feature_layers"), **hparams)
        if "layer_dims" not in tensors:  # a fit checkpoint of pass 0: nothing fitted yet
            return detector
        dims, mins, maxs = tensors["layer_dims"], tensors["mins"], tensors["maxs"]
        if dims.numel() == 0 or bool((dims < 1).any()) or int(dims.max()) != mins.shape[3]:
            raise ValueError(f"layer_dims {dims.tolist()} must be >= 1 with maximum {mins.shape[3]}")
        if mins.shape != maxs.shape or mins.shape[0] != dims.shape[0]:
            raise ValueError("mins and maxs must both be L x P x C x M with one layer_dims entry per layer")
        if mins.shape[1] != len(detector.poles(int(dims.shape[0]))):
            raise ValueError(f"the state has {mins.shape[1]} poles, num_poles_list gives {detector.num_poles_list}")
        for i, width in enumerate(dims.tolist()):
            if mins[i, ..., width:].any() or maxs[i, ..., width:].any():
                raise ValueError(f"layer {i}: padding beyond its width {width} is not zero")
        return detector

    # ------------------------------------------------------------------ sizes
    @property
    def num_classes(self) -> int | None:
        return self.n_classes

    @property
    def num_layers(self) -> int | None:
        """Number of layers of the fitted state (else of ``feature_layers``, if given)."""
        if self.layer_dims.numel():
            return int(self.layer_dims.shape[0])
        return None if self.feature_layers is None else len(self.feature_layers)

    def poles(self, layers: int) -> list[int]:
        """The poles used with ``layers`` layers (``num_poles_list``, default ``1..layers``)."""
        return self.num_poles_list if self.num_poles_list is not None else list(range(1, layers + 1))

    def check_state(self) -> None:
        """Finite tensors, ``mins <= maxs``, positive expected deviations."""
        super().check_state()
        if bool((self.mins > self.maxs).any()):
            raise InvalidStateError("Gram tensor 'mins' exceeds 'maxs'")
        if self.layer_norm.shape != self.layer_dims.shape or bool((self.layer_norm <= 0).any()):
            raise InvalidStateError("Gram tensor 'layer_norm' must hold one positive value per layer")

    # ------------------------------------------------------------------ networks
    def _extract(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        """Outputs of every layer, each fed to the next."""
        return chained_outputs(self._require("feature_layers"), x)  # type: ignore[arg-type]

    def predict(self, x: Tensor) -> Tensor:
        """Scores inputs ``x``: through the layers, ``head`` on the last output, then the deviations."""
        self._check_fitted()
        with torch.no_grad():
            maps = self._extract(x)
            logits = self._require("head")(maps[-1])
        return self.predict_structured(logits, maps)

    def predict_features(self, x: Any) -> Tensor:
        """:param x: list of per-layer outputs (``B x D_l x ...``); ``head`` gives the logits of the last one"""
        self._check_fitted()
        if not isinstance(x, (list, tuple)) or not x:
            raise ValueError("Gram expects a non-empty list of per-layer feature maps")
        with torch.no_grad():
            logits = self._require("head")(x[-1])
        return self.predict_structured(logits, x)

    def predict_structured(self, logits: Tensor, feature_list: Sequence[Tensor]) -> Tensor:
        """:param logits: ``B x C`` logits; :param feature_list: per-layer outputs; returns ``B`` scores"""
        self._check_fitted()
        layers = int(self.layer_dims.shape[0])
        if len(feature_list) != layers:
            raise ValueError(f"expected a list of {layers} per-layer feature maps, got {len(feature_list)}")
        if logits.dim() != 2 or logits.shape[1] != self.n_classes:
            raise ValueError(f"Gram expects B x {self.n_classes} logits, got shape {tuple(logits.shape)}")
        predicted = self._to_device(logits.detach()).argmax(dim=1)
        poles = self.poles(layers)
        total = torch.zeros(logits.shape[0], dtype=torch.float64, device=self.device)
        for i, maps in enumerate(feature_list):
            width = int(self.layer_dims[i])
            if maps.shape[1] != width:
                raise ValueError(f"layer {i} has {maps.shape[1]} channels, the fit had {width}")
            g = gram_vectors(self._to_device(maps), poles)
            mins = self.mins[i][:, predicted, :width]
            maxs = self.maxs[i][:, predicted, :width]
            total += deviation(g, mins, maxs).sum(dim=0) / self.layer_norm[i]
        return total.to(logits.dtype if logits.is_floating_point() else torch.float32)
