"""Load a detector state for a served model and validate it BEFORE it can replace the active one.

Servable detectors consume one network output (``input_kind`` ``logits``, ``features`` or ``feature_maps``) that
the model's config names a graph node for; on a segmentation model they must support per-pixel scores
(``supports_segmentation``) on logits or feature maps. Detectors of kind ``input`` (ODIN, MCD: the network in the
loop, gradients or dropout sampling per request) and ``multi_features`` are refused with 422: they would hold the
batch worker far longer than one forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ood_core.api import Detector, InvalidStateError
from ood_core.state import detector_class, load_detector, read_state_info
from service.engine.served_model import ServedModel
from service.errors import UnservableDetectorError

SERVABLE_KINDS = ("logits", "features", "feature_maps")


def check_servable(model: ServedModel, cls: type[Detector]) -> str:
    """The network output ``cls`` consumes on ``model``; raise :class:`UnservableDetectorError` otherwise."""
    kind = cls.input_kind
    name = cls.__name__
    if kind not in SERVABLE_KINDS:
        raise UnservableDetectorError(
            f"{name} has input_kind {kind!r}: it needs the network in the loop (or several layers) and is not "
            f"served; servable kinds: {', '.join(SERVABLE_KINDS)}"
        )
    if model.task == "segmentation" and (not cls.supports_segmentation or kind == "features"):
        raise UnservableDetectorError(f"{name} gives no per-pixel scores: not servable on segmentation models")
    if kind not in model.outputs:
        raise UnservableDetectorError(f"{name} consumes {kind!r} but model {model.name!r} has no {kind} graph node")
    return kind


def external_modules(model: ServedModel, cls: type[Detector], kind: str) -> dict[str, Any]:
    """The networks ``cls`` declares in ``external_modules``, taken from the model."""
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
    kind = check_servable(model, cls)
    expected = model.dims[kind]
    if info.feature_dim is not None and kind != "logits" and info.feature_dim != expected:
        raise InvalidStateError(
            f"{info.cls} state was fitted on {kind} of dimension {info.feature_dim}; model {model.name!r} gives "
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
    smoke_test(model, detector, kind)
    return detector


def smoke_test(model: ServedModel, detector: Detector, kind: str) -> None:
    """Score the warm-up outputs: the state must run on this model's outputs and give one score per image
    (per pixel for segmentation)."""
    probe = model.probe[kind]
    try:
        with torch.no_grad():
            scores = detector.predict_features(probe)
    except Exception as exc:  # any failure here means the state does not fit the model
        raise InvalidStateError(f"state does not run on model {model.name!r}'s {kind}: {exc}") from exc
    batch = probe.shape[0]
    ok = scores.shape[0] == batch and (scores.dim() == 1 if model.task == "classification" else scores.dim() == 3)
    if not ok:
        raise InvalidStateError(f"state gives scores of shape {tuple(scores.shape)} for a batch of {batch}")
