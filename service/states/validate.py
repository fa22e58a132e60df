"""Load a detector state for a served model and validate it BEFORE it can replace the active one.

What a model serves, by the detector's ``input_kind``:

* ``logits``, ``features``, ``feature_maps`` (:data:`SERVABLE_KINDS`): one network output that the model's config
  names a graph node for; on a segmentation model only detectors with per-pixel scores (``supports_segmentation``)
  on logits or feature maps. These are also the kinds the service's fit (``/fit``, ``ood-fit``) fits.
* ``multi_features`` (Gram, MultiMahalanobis): the outputs of the config's ``nodes.layers`` list, from the same
  forward; classification models only; the state's layers must match the list in number and width.
* ``input`` (ODIN, MCD, MahalanobisODIN, GradNorm, GradUncertainty, NACUE): the network in the loop, run by the
  batch worker on the batch's preprocessed inputs (:mod:`service.engine.scoring`) through modules sharing the
  served network's parameters (:meth:`ServedModel.loop_networks`): the logits (MahalanobisODIN: the features;
  NACUE: the logits, with its ``layers`` tapped at the ``nodes.layers`` outputs). On segmentation models only ODIN
  and MCD (per-pixel scores).

The last two are served from uploaded states only (:func:`check_servable` refuses them for fitting unless
``upload=True``). :data:`UNSERVABLE` names the classes no served network can feed (MCM), with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError
from ood_core.state import detector_class, load_detector, read_state_info
from service.engine.networks import TappedLogits, layer_keys
from service.engine.served_model import ServedModel
from service.errors import UnservableDetectorError

SERVABLE_KINDS = ("logits", "features", "feature_maps")
"""One-forward kinds: served from one output, and fitted by the service."""
UPLOAD_KINDS = ("multi_features", "input")
"""Kinds served from uploaded states only."""
UNSERVABLE = {
    "MCM": (
        "MCM matches a vision-language model's image embeddings (e.g. CLIP's) with the text embeddings of the class "
        "prompts: a served classifier's features are not in the text embeddings' space, so MCM is not served; run it "
        "with ood_core on your own image encoder"
    ),
}
"""Detector class -> why no served model can use it."""
LOOP_NETWORK = {"MahalanobisODIN": "features", "NACUE": "layers"}
"""The :meth:`ServedModel.loop_networks` entry an ``input`` detector runs (default ``logits``)."""


def check_servable(model: ServedModel, cls: type[Detector], *, upload: bool = False) -> str:
    """The input kind ``cls`` consumes on ``model``; raise :class:`UnservableDetectorError` otherwise. Without
    ``upload`` (the fit paths) only :data:`SERVABLE_KINDS`."""
    kind = cls.input_kind
    name = cls.__name__
    if name in UNSERVABLE:
        raise UnservableDetectorError(UNSERVABLE[name])
    if kind in UPLOAD_KINDS:
        what = "the network in the loop" if kind == "input" else "several layers"
        if not upload:
            raise UnservableDetectorError(
                f"{name} has input_kind {kind!r} ({what}): not served by the service's fit; fit and calibrate it with "
                "ood_core (save_detector) and upload the state; fittable kinds: " + ", ".join(SERVABLE_KINDS)
            )
        _check_upload_kind(model, cls, kind)
        return kind
    if kind not in SERVABLE_KINDS:
        raise UnservableDetectorError(f"{name} has input_kind {kind!r}: not served")
    if model.task == "segmentation" and (not cls.supports_segmentation or kind == "features"):
        raise UnservableDetectorError(f"{name} gives no per-pixel scores: not servable on segmentation models")
    if kind not in model.outputs:
        raise UnservableDetectorError(f"{name} consumes {kind!r} but model {model.name!r} has no {kind} graph node")
    return kind


def _check_upload_kind(model: ServedModel, cls: type[Detector], kind: str) -> None:
    name = cls.__name__
    if model.task == "segmentation" and not cls.supports_segmentation:
        raise UnservableDetectorError(f"{name} gives no per-pixel scores: not servable on segmentation models")
    needs = "layers" if kind == "multi_features" else LOOP_NETWORK.get(name, "logits")
    if needs == "layers" and not model.config.nodes.layers:
        raise UnservableDetectorError(
            f"{name} needs the outputs of several layers but model {model.name!r} configures no nodes.layers"
        )
    if needs == "features" and "features" not in model.outputs:
        raise UnservableDetectorError(f"{name} needs features but model {model.name!r} has no features graph node")


def external_modules(model: ServedModel, cls: type[Detector], kind: str) -> dict[str, Any]:
    """The networks ``cls`` declares in ``external_modules``, taken from the model."""
    if kind == "multi_features":  # scored from the served outputs: no network needed
        return {n: None for n in cls.external_modules}
    if kind == "input":
        net = model.loop_networks()[LOOP_NETWORK.get(cls.__name__, "logits")]
        modules: dict[str, Any] = {n: net for n in cls.external_modules}
        if "layers" in modules and isinstance(net, TappedLogits):
            modules["layers"] = list(net.taps)
        return modules
    nets = model.networks()[kind]
    missing = [n for n in cls.external_modules if n in ("head",) and nets.get(n) is None]
    if missing:
        raise UnservableDetectorError(
            f"{cls.__name__} needs a {kind} head but model {model.name!r} configures none (heads.{kind})"
        )
    return {n: nets.get(n) for n in cls.external_modules}


def build_detector(model: ServedModel, data: bytes | Path) -> Detector:
    """Parse, validate against ``model``, load onto the model's device and smoke-test a state.

    Raises :class:`InvalidStateError` (422, with the reason) or :class:`UnservableDetectorError` (422).
    """
    info = read_state_info(data)
    cls = detector_class(info.cls)
    kind = check_servable(model, cls, upload=True)
    dim_kind = LOOP_NETWORK.get(cls.__name__, "logits") if kind == "input" else kind
    expected = model.dims.get(dim_kind)
    if info.feature_dim is not None and dim_kind != "logits" and info.feature_dim != expected:
        raise InvalidStateError(
            f"{info.cls} state was fitted on {dim_kind} of dimension {info.feature_dim}; model {model.name!r} gives "
            f"{expected}"
        )
    if info.num_classes is not None and info.num_classes != model.dims["logits"]:
        raise InvalidStateError(
            f"{info.cls} state was fitted for {info.num_classes} classes; model {model.name!r} has "
            f"{model.dims['logits']}"
        )
    modules = external_modules(model, cls, kind)
    net = modules.pop("model", None)
    try:
        detector = load_detector(data, model=net, **modules).to(model.device).eval()
    except InvalidStateError:
        raise
    except Exception as exc:  # whatever a malformed state trips over: the upload is refused, never a 500
        raise InvalidStateError(f"cannot load {info.cls} state: {type(exc).__name__}: {exc}") from exc
    _check_layers(model, detector, kind)
    smoke_test(model, detector, kind)
    return detector


def _check_layers(model: ServedModel, detector: Detector, kind: str) -> None:
    """A state fitted on several layers has one per ``nodes.layers`` entry, each as wide as its output."""
    dims = getattr(detector, "layer_dims", None)
    if not isinstance(dims, Tensor) or kind not in UPLOAD_KINDS:
        return
    want = [model.dims[key] for key in layer_keys(model.config)]
    if dims.tolist() != want:
        raise InvalidStateError(
            f"{type(detector).__name__} state was fitted on layers of widths {dims.tolist()}; model "
            f"{model.name!r}'s nodes.layers give {want}"
        )


def smoke_test(model: ServedModel, detector: Detector, kind: str) -> None:
    """Score the warm-up outputs (``input`` detectors: the warm-up inputs): the state must run on this model and
    give one score per image (per pixel for segmentation)."""
    try:
        scores = _probe_scores(model, detector, kind)
    except Exception as exc:  # any failure here means the state does not fit the model
        raise InvalidStateError(f"state does not run on model {model.name!r}'s {kind}: {exc}") from exc
    batch = model.probe["logits"].shape[0]
    ok = scores.shape[0] == batch and (scores.dim() == 1 if model.task == "classification" else scores.dim() == 3)
    if not ok:
        raise InvalidStateError(f"state gives scores of shape {tuple(scores.shape)} for a batch of {batch}")


def _probe_scores(model: ServedModel, detector: Detector, kind: str) -> Tensor:
    """The scores of the warm-up batch, computed as the batch worker does (:mod:`service.engine.scoring`)."""
    if kind == "input":
        staged = model.stage([model.blank_pixels()] * model.probe["logits"].shape[0])
        with torch.no_grad():
            return detector.predict(model.loop_inputs(staged))
    with torch.no_grad():
        if kind == "multi_features":
            layers = [model.probe[key] for key in layer_keys(model.config)]
            structured = getattr(detector, "predict_structured", None)
            if structured is not None:
                return structured(model.probe["logits"], layers)  # type: ignore[no-any-return]
            return detector.predict_features(layers)  # type: ignore[arg-type]
        return detector.predict_features(model.probe[kind])
