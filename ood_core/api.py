"""The detector API shared by every detector; re-exports the library's exceptions from :mod:`ood_core.errors`.

The interface mirrors pytorch-ood's ``pytorch_ood.api.Detector`` so code ports by changing the import:
``fit(loader)``, ``fit_features(x, y)``, ``predict(x)``, ``predict_features(x)`` and ``__call__`` -> ``predict``.
Higher scores mean "more out-of-distribution"; labels < 0 mark OOD samples.

Beyond pytorch-ood, a ``Detector`` is a ``torch.nn.Module`` whose fitted state lives in registered buffers,
declared in :attr:`Detector.state_spec`, so that ``detector.to(device)`` moves it and
:mod:`ood_core.state` can save it to and load it from safetensors with full validation.
Networks handed to the constructor (``model``, ``head``, ``backbone``) are *not* submodules: they are
neither saved with the state nor moved by ``detector.to``; pass them again when loading.
"""

from __future__ import annotations

import json
from abc import ABC
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import torch
from torch import Tensor, nn

from ood_core.calibration import Calibration

# the library's exceptions, defined in ood_core.errors and re-exported here (``X as X``: explicit re-exports)
from ood_core.errors import FeaturesNotSupportedError as FeaturesNotSupportedError
from ood_core.errors import InvalidStateError as InvalidStateError
from ood_core.errors import ModelNotSetException as ModelNotSetException
from ood_core.errors import OODError as OODError
from ood_core.errors import RequiresFitException as RequiresFitException
from ood_core.errors import RequiresFittingException as RequiresFittingException
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


class Detector(nn.Module, ABC):
    """Abstract base class of an OOD detector.

    Subclasses set the class attributes below and implement :meth:`predict_features` (and, when the
    detector needs fitting, :meth:`_fit_batch` / :meth:`_finish_fit` or :meth:`_fit_all`, plus
    :meth:`_fit_statistics` / :meth:`_merge_fit_statistics` for statistics other than the buffered batches).

    Fits are mergeable and resumable (pytorch-ood#9): :meth:`begin_fit`, :meth:`partial_fit_features` /
    :meth:`partial_fit`, :meth:`fit_statistics`, :meth:`merge_fit_statistics` and :meth:`finish_pass`, over
    :attr:`fit_passes` passes; :meth:`fit` and :meth:`fit_features` are built on them. See ``docs/fitting.md``.
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

    def _outputs(self, data_loader: Iterable[Any], device: str | torch.device | None) -> Iterator[tuple[Any, Tensor]]:
        """``(network output, labels)`` per batch of the loader (inputs moved to ``device`` when given)."""
        for x, y in _batches(data_loader):
            if device is not None:
                x = x.to(device)
            with torch.no_grad():
                z = self._extract(x)
            yield z, y

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

    # ------------------------------------------------------------------ mergeable, resumable fits (public)
    # A fit is a sequence of passes over the data. Each pass folds batches into statistics
    # (partial_fit_features / partial_fit), which can be exported (fit_statistics), merged with another
    # shard's (merge_fit_statistics) or checkpointed (ood_core.fit_checkpoint), and is then finished
    # (finish_pass). Subclasses implement the private hooks _begin_fit / _fit_batch / _finish_fit (per pass,
    # reading self.fit_pass) and _fit_statistics / _merge_fit_statistics; the default hooks buffer the
    # batches and hand them to _fit_all at the end (statistics: the buffered outputs and labels, gathered).
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


def _batches(loader: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("fit(loader) expects batches of (inputs, labels)")
        yield batch[0], torch.as_tensor(batch[1])


def model_or_encoder(model: Any, encoder: Any, owner: str) -> Any:
    """The network given as ``model`` or as ``encoder`` (pytorch-ood 0.4's name for it), not both."""
    if model is not None and encoder is not None:
        raise TypeError(f"{owner} got both model and encoder: pass the network once")
    net = model if model is not None else encoder
    if net is not None and not callable(net):
        raise TypeError(f"{owner} model must be a callable network, got {type(net).__name__}")
    return net


def required(owner: str, **arguments: Any) -> None:
    """``TypeError`` naming the first of ``arguments`` left at ``None`` (required arguments that follow an
    optional ``model`` / ``encoder``, which Python cannot express as required keywords)."""
    for name, value in arguments.items():
        if value is None:
            raise TypeError(f"{owner}() missing required argument: '{name}'")


def known_mask(y: Tensor) -> Tensor:
    """Boolean mask of in-distribution samples (label >= 0)."""
    return y >= 0


def _concat_items(items: list[tuple[Any, Tensor]]) -> tuple[Any, Tensor]:
    """Concatenate buffered ``(z, y)`` batches: one tensor, or one per layer for lists of tensors."""
    ys = torch.cat([y.reshape(-1).cpu() for _, y in items])
    if isinstance(items[0][0], Tensor):
        return (items[0][0] if len(items) == 1 else torch.cat([z for z, _ in items])), ys
    layers = list(zip(*[z for z, _ in items], strict=True))
    return [torch.cat(list(t)) for t in layers], ys


def _first_device(z: Any) -> torch.device:
    return z.device if isinstance(z, Tensor) else z[0].device


#: the statistics entry naming the class, hyperparameters and pass (UTF-8 JSON in a uint8 tensor)
FIT_SIGNATURE_KEY = "fit_signature"
#: longest signature accepted by :func:`decode_fit_signature`
MAX_SIGNATURE_BYTES = 1 << 16


def _is_statistics_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable() and name != FIT_SIGNATURE_KEY


def encode_fit_signature(signature: dict[str, Any]) -> Tensor:
    """The signature as UTF-8 JSON bytes in a uint8 tensor (so it travels with the statistics)."""
    data = json.dumps(signature, sort_keys=True, allow_nan=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_fit_signature(t: Tensor) -> dict[str, Any]:
    """Inverse of :func:`encode_fit_signature`; ``ValueError`` for anything else."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > MAX_SIGNATURE_BYTES:
        raise ValueError(f"'{FIT_SIGNATURE_KEY}' must be a 1-D uint8 tensor of at most {MAX_SIGNATURE_BYTES} bytes")
    try:
        obj = json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"'{FIT_SIGNATURE_KEY}' is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"class", "hparams", "pass", "passes"}:
        raise ValueError(f"'{FIT_SIGNATURE_KEY}' must be an object with class, hparams, pass and passes")
    return obj


def check_fit_signature(own: dict[str, Any], other: dict[str, Any]) -> None:
    """Refuse to merge statistics of another class, hyperparameters or pass, saying which differs."""
    if other["class"] != own["class"]:
        raise ValueError(f"cannot merge fit statistics of {other['class']!r} into a {own['class']!r} fit")
    if other["hparams"] != own["hparams"]:
        raise ValueError(
            f"cannot merge {own['class']} fit statistics with other hyperparameters: {other['hparams']} "
            f"instead of {own['hparams']}"
        )
    if other["pass"] != own["pass"] or other["passes"] != own["passes"]:
        raise ValueError(
            f"cannot merge {own['class']} fit statistics of pass {other['pass']} (of {other['passes']}) into "
            f"pass {own['pass']} (of {own['passes']})"
        )
