"""The detector API shared by every detector; re-exports the library's exceptions from :mod:`ood_core.errors`.

The interface mirrors pytorch-ood's ``pytorch_ood.api.Detector`` so code ports by changing the import:
``fit(loader)``, ``fit_features(x, y)``, ``predict(x)``, ``predict_features(x)`` and ``__call__`` -> ``predict``.
Higher scores mean "more out-of-distribution"; labels < 0 mark OOD samples.

Beyond pytorch-ood, a ``Detector`` is a ``torch.nn.Module`` whose fitted state lives in registered buffers,
declared in :attr:`Detector.state_spec`, so that ``detector.to(device)`` moves it and
:mod:`ood_core.state` can save it to and load it from safetensors with full validation.
Networks handed to the constructor (``model``, ``head``, ``backbone``) are *not* submodules: they are
neither saved with the state nor moved by ``detector.to``; pass them again when loading.

The mergeable, resumable fit protocol lives in :mod:`ood_core.fitting_protocol` (the mixin
:class:`~ood_core.fitting_protocol.MergeableFit`), its statistics' signature in :mod:`ood_core.fit_signature`,
and the constructor-argument helpers (``model_or_encoder``, ``required``) in :mod:`ood_core.constructor_args`;
every name they held here is re-exported, so ``from ood_core.api import ...`` keeps working.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import torch
from torch import Tensor, nn

from ood_core.calibration import Calibration

# helpers defined in their own modules, re-exported here (``X as X``: explicit re-exports)
from ood_core.constructor_args import model_or_encoder as model_or_encoder
from ood_core.constructor_args import required as required

# the library's exceptions, defined in ood_core.errors and re-exported here
from ood_core.errors import FeaturesNotSupportedError as FeaturesNotSupportedError
from ood_core.errors import InvalidStateError as InvalidStateError
from ood_core.errors import ModelNotSetException as ModelNotSetException
from ood_core.errors import OODError as OODError
from ood_core.errors import RequiresFitException as RequiresFitException
from ood_core.errors import RequiresFittingException as RequiresFittingException
from ood_core.fit_signature import FIT_SIGNATURE_KEY as FIT_SIGNATURE_KEY
from ood_core.fit_signature import MAX_SIGNATURE_BYTES as MAX_SIGNATURE_BYTES
from ood_core.fit_signature import _is_statistics_name as _is_statistics_name
from ood_core.fit_signature import check_fit_signature as check_fit_signature
from ood_core.fit_signature import decode_fit_signature as decode_fit_signature
from ood_core.fit_signature import encode_fit_signature as encode_fit_signature
from ood_core.fitting_protocol import MergeableFit as MergeableFit
from ood_core.fitting_protocol import _batches as _batches
from ood_core.fitting_protocol import _concat_items as _concat_items
from ood_core.fitting_protocol import _first_device as _first_device
from ood_core.utils import all_finite

InputKind = Literal["logits", "features", "feature_maps", "input", "multi_features"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a fitted-state tensor must have.

    ``dims`` holds ints (fixed sizes) or symbols: ``"D"`` is the feature dimension, ``"C"`` the number of
    classes (both stored in the state's metadata); any other symbol is free but must be the same
    wherever it appears within one state.
    """

    dims: tuple[int | str, ...]
    dtype: torch.dtype = torch.float32


class Detector(nn.Module, MergeableFit, ABC):
    """Abstract base class of an OOD detector.

    Subclasses set the class attributes below and implement :meth:`predict_features` (and, when the
    detector needs fitting, :meth:`_fit_batch` / :meth:`_finish_fit` or :meth:`_fit_all`, plus
    :meth:`_fit_statistics` / :meth:`_merge_fit_statistics` for statistics other than the buffered batches).

    Fits are mergeable and resumable (pytorch-ood#9): :meth:`begin_fit`, :meth:`partial_fit_features` /
    :meth:`partial_fit`, :meth:`fit_statistics`, :meth:`merge_fit_statistics` and :meth:`finish_pass`, over
    :attr:`fit_passes` passes, inherited from :class:`~ood_core.fitting_protocol.MergeableFit`; :meth:`fit` and
    :meth:`fit_features` are built on them. See ``docs/fitting.md``.
    """

    #: buffers that make up the fitted state (saved by :mod:`ood_core.state`)
    state_spec: ClassVar[dict[str, TensorSpec]] = {}
    #: whether predictions need a fitted state
    requires_fit: ClassVar[bool] = False
    #: what ``predict_features`` consumes; the service routes the matching network output to it
    input_kind: ClassVar[InputKind] = "logits"
    #: whether ``predict_features`` accepts ``B x C x H x W`` input and returns ``B x H x W`` scores
    supports_segmentation: ClassVar[bool] = False
    #: constructor arguments that are networks: kept out of the module tree and out of saved states
    external_modules: ClassVar[tuple[str, ...]] = ("model",)

    def __init__(self) -> None:
        super().__init__()
        self._is_fitted = not self.requires_fit
        self._fit_pass = 0
        self._fit_active = False
        #: ID calibration (threshold, p-values) attached by :func:`ood_core.state.load_detector`
        self.calibration: Calibration | None = None
        for name, spec in self.state_spec.items():
            self.register_buffer(name, torch.empty((0,) * max(len(spec.dims), 1), dtype=spec.dtype))

    # ------------------------------------------------------------------ plumbing
    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).external_modules:
            object.__setattr__(self, name, value)  # do not register as a submodule
        else:
            super().__setattr__(name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        """Same as :meth:`predict` (pytorch-ood's convention)."""
        return self.predict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)

    @property
    def is_fitted(self) -> bool:
        return self._is_fitted

    @property
    def device(self) -> torch.device:
        """Device of the fitted state (CPU for detectors without tensors)."""
        for buf in self.buffers():
            return buf.device
        return torch.device("cpu")

    def hparams(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments (without networks and tensors)."""
        return {}

    @property
    def feature_dim(self) -> int | None:
        """Dimension of the input ``predict_features`` expects (channels for feature maps), if known."""
        return None

    @property
    def num_classes(self) -> int | None:
        """Number of classes the detector was fitted for, if it depends on it."""
        return None

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> Self:
        """Build an unfitted instance from saved hyperparameters; :mod:`ood_core.state` then loads buffers.

        Override when the constructor takes tensors (``tensors`` holds every saved tensor).
        """
        return cls(**modules, **hparams)

    def _mark_fitted(self) -> None:
        self._is_fitted = True

    def check_state(self) -> None:
        """Refuse fitted values that would silently break scoring: raise :class:`InvalidStateError` naming
        the problem.

        Called by :func:`ood_core.state.load_detector` once the buffers are set, and by :meth:`fit` /
        :meth:`fit_features` before the detector counts as fitted. The default checks that every floating
        tensor of :attr:`state_spec` is finite; detectors with more structure (a precision matrix, a feature
        bank) override it, calling ``super().check_state()`` first.
        """
        for name in self.state_spec:
            if not all_finite(getattr(self, name)):
                raise InvalidStateError(f"{type(self).__name__} tensor '{name}' contains NaN or Inf")

    def _check_fitted(self) -> None:
        if not self._is_fitted:
            raise RequiresFitException(f"{type(self).__name__} has to be fitted before it can predict")

    def _require(self, name: str = "model") -> Callable[..., Tensor]:
        net = getattr(self, name, None)
        if net is None:
            raise ModelNotSetException(f"{type(self).__name__}.{name} is not set")
        return net  # type: ignore[no-any-return]

    def _to_device(self, x: Tensor) -> Tensor:
        """Move an input to the device of the fitted state."""
        dev = self.device
        return x if x.device == dev or not self.state_spec else x.to(dev)

    # ------------------------------------------------------------------ fitting
    def _extract(self, x: Tensor) -> Tensor:
        """Network output that ``fit``/``predict`` feed to the ``*_features`` methods."""
        return self._require("model")(x)

    def fit(self, data_loader: Iterable[Any], device: str | torch.device | None = None) -> Self:
        """Fit on a loader of ``(x, y)`` batches, streaming: batches are passed through the network and
        folded into the fit one by one (detectors with sufficient statistics never hold the data set).

        The loader is iterated :attr:`fit_passes` times. A one-shot iterator (a generator, ``zip``) cannot be
        read twice: for a detector with several passes its network outputs are then kept from the first
        pass for the later ones (memory grows with the data; pass a ``DataLoader`` or a list to stream).
        Detectors that need no fitting return at once."""
        passes = self.fit_passes
        if passes == 0:
            return self
        self.begin_fit()
        if passes > 1 and isinstance(data_loader, Iterator):
            kept: list[tuple[Any, Tensor]] = []
            for z, y in self._outputs(data_loader, device):
                kept.append((z, y))
                self.partial_fit_features(z, y)
            while not self.finish_pass():
                for z, y in kept:
                    self.partial_fit_features(z, y)
            return self
        while True:
            self.partial_fit(data_loader, device)
            if self.finish_pass():
                return self

    def fit_features(self, x: Any, y: Tensor, device: str | torch.device | None = None) -> Self:
        """Fit directly on network outputs (features or logits, per :attr:`input_kind`) and labels.

        ``device`` (as in pytorch-ood) moves the inputs there before fitting; by default they stay put.
        Detectors with several passes read the same outputs once per pass."""
        if self.fit_passes == 0:
            return self
        if device is not None:
            x = [t.to(device) for t in x] if isinstance(x, (list, tuple)) else x.to(device)
            y = y.to(device)
        self.begin_fit()
        while True:
            self.partial_fit_features(x, y)
            if self.finish_pass():
                return self

    # ------------------------------------------------------------------ prediction
    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores for inputs ``x``, which are passed through the network."""
        self._check_fitted()
        with torch.no_grad():
            z = self._extract(x)
        return self.predict_features(z)

    def predict_features(self, x: Tensor) -> Tensor:
        """Outlier scores from network outputs (see :attr:`input_kind`)."""
        raise FeaturesNotSupportedError(
            f"{type(self).__name__} needs the network in the loop and cannot score features; use predict(x)"
        )


def known_mask(y: Tensor) -> Tensor:
    """Boolean mask of in-distribution samples (label >= 0)."""
    return y >= 0
