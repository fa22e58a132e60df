"""What a model answers under the Open Inference Protocol: its input and output tensors (metadata), which outputs
a request may ask for, and the output tensors built from the batch worker's finished results (nothing is
recomputed here: every value is the one ``/v1`` answers).

Inputs (send exactly one): ``images`` (``BYTES [N]``, encoded files) or ``pixels`` (``UINT8`` or ``FP32``
``[N, C, H, W]``, C = 1 or 3, any size: resized like a file; see :mod:`service.engine.tensors`).

Outputs, all of first dimension N (one row per image, in request order):

* classification: ``prediction`` (``INT64``, class index), ``probability`` (``FP32``, its softmax probability),
  and per selected detector ``score/<name>`` (``FP32``), ``is_ood/<name>`` (``BOOL``, score > threshold),
  ``p_value/<name>`` (``FP64``, conformal) and ``threshold/<name>`` (``FP64``, the one used);
* segmentation: per selected detector ``score/<name>`` (``FP32 [N, H, W]``, the per-pixel map at the model's input
  size), ``ood_share/<name>`` (``FP64``, share of pixels above the threshold), ``max_score/<name>`` (``FP32``) and
  ``threshold/<name>`` (``FP64``).

``threshold``, ``is_ood`` and ``ood_share`` need the state's calibration or ``parameters.threshold``; ``p_value``
needs the calibration: a detector without them does not offer these outputs (asking for one is a 400).
Detector outputs carry ``parameters.detector_version``, the version of the state that scored.
"""

from __future__ import annotations

import numpy as np

from service.api.v2_codec import OutputTensor
from service.api.v2_schemas import Datatype, V2RequestOutput, V2TensorMetadata
from service.engine.active import ActiveDetector
from service.engine.items import ItemResult
from service.engine.served_model import ServedModel
from service.errors import BadRequestError

IMAGES_INPUT, PIXELS_INPUT = "images", "pixels"
INPUT_TYPES: dict[str, tuple[str, ...]] = {IMAGES_INPUT: ("BYTES",), PIXELS_INPUT: ("UINT8", "FP32")}
CLASSIFICATION_OUTPUTS: dict[str, Datatype] = {"prediction": "INT64", "probability": "FP32"}
DETECTOR_OUTPUTS: dict[str, dict[str, Datatype]] = {
    "classification": {"score": "FP32", "is_ood": "BOOL", "p_value": "FP64", "threshold": "FP64"},
    "segmentation": {"score": "FP32", "ood_share": "FP64", "max_score": "FP32", "threshold": "FP64"},
}
NEEDS_THRESHOLD = {"is_ood", "threshold", "ood_share"}
NEEDS_CALIBRATION = {"p_value"}
MAP_OUTPUTS = {"segmentation": {"score"}, "classification": set()}
"""Per-pixel outputs (shape ``[N, H, W]``)."""


def input_metadata(model: ServedModel) -> list[V2TensorMetadata]:
    return [
        V2TensorMetadata(name=IMAGES_INPUT, datatype="BYTES", shape=[-1]),
        V2TensorMetadata(name=PIXELS_INPUT, datatype="UINT8", shape=[-1, model.preprocessor.channels, -1, -1]),
    ]


def available_outputs(
    model: ServedModel, detectors: tuple[ActiveDetector, ...], threshold: float | None
) -> dict[str, Datatype]:
    """The outputs a request with these detectors and ``parameters.threshold`` can get: name -> datatype, in the
    default order."""
    out: dict[str, Datatype] = dict(CLASSIFICATION_OUTPUTS) if model.task == "classification" else {}
    for active in detectors:
        calibrated = active.detector.calibration is not None
        for kind, datatype in DETECTOR_OUTPUTS[model.task].items():
            if kind in NEEDS_THRESHOLD and not (calibrated or threshold is not None):
                continue
            if kind in NEEDS_CALIBRATION and not calibrated:
                continue
            out[f"{kind}/{active.name}"] = datatype
    return out


def output_metadata(model: ServedModel) -> list[V2TensorMetadata]:
    """Every output with all active detectors and no request parameters."""
    height, width = model.config.input_size
    active = tuple(model.detectors[name] for name in sorted(model.detectors))
    maps = MAP_OUTPUTS[model.task]
    return [
        V2TensorMetadata(
            name=name, datatype=datatype, shape=[-1, height, width] if name.split("/")[0] in maps else [-1]
        )
        for name, datatype in available_outputs(model, active, None).items()
    ]


def map_bytes(model: ServedModel, names: list[tuple[str, bool]], count: int) -> int:
    """Upper estimate of the answer's per-pixel outputs (binary float32: 4 bytes a pixel; JSON: 24)."""
    height, width = model.config.input_size
    maps = MAP_OUTPUTS[model.task]
    return sum(count * height * width * (4 if binary else 24) for name, binary in names if name.split("/")[0] in maps)


def build_outputs(
    model: ServedModel, detectors: tuple[ActiveDetector, ...], results: list[ItemResult], names: list[str]
) -> dict[str, OutputTensor]:
    """The output tensors ``names`` (all offered by :func:`available_outputs`) from the finished results."""
    by_name = {active.name: active for active in detectors}
    out = {}
    for name in names:
        kind, _, detector = name.partition("/")
        datatype = DETECTOR_OUTPUTS[model.task][kind] if detector else CLASSIFICATION_OUTPUTS[kind]
        if not detector:
            values: list[object] = [r.class_index if kind == "prediction" else r.probability for r in results]
            out[name] = OutputTensor(name, datatype, _array(values, datatype))
            continue
        active = by_name[detector]
        if kind == "score" and model.task == "segmentation":
            array = np.stack([r.maps[detector].numpy() for r in results]).astype(np.float32)
        elif kind in ("score", "max_score"):  # the real value (the JSON verdict's null for non-finite is not)
            array = _array([r.scores[detector] for r in results], datatype)
        else:
            array = _array([r.verdicts[detector][kind] for r in results], datatype)
        out[name] = OutputTensor(name, datatype, array, {"detector_version": active.stored.version})
    return out


def _array(values: list[object], datatype: str) -> np.ndarray:
    if datatype in ("FP32", "FP64"):
        return np.array(
            [np.nan if v is None else v for v in values], dtype=np.float32 if datatype == "FP32" else np.float64
        )
    return np.array(values, dtype=np.int64 if datatype == "INT64" else np.bool_)


def select_outputs(
    model: ServedModel,
    available: dict[str, Datatype],
    requested: list[V2RequestOutput] | None,
    binary_data_output: bool | None,
) -> list[tuple[str, bool]]:
    """The outputs to answer, in order, each with whether it goes as binary data: the requested ones (``binary_data``
    on the output, else ``binary_data_output``), or all available ones when none are requested."""
    default = bool(binary_data_output)
    if not requested:
        return [(name, default) for name in available]
    out: list[tuple[str, bool]] = []
    for output in requested:
        name = output.name
        if name not in available:
            raise BadRequestError(_unavailable(model, name, available))
        if any(name == seen for seen, _ in out):
            raise BadRequestError(f"output {name!r} is requested twice")
        flag = output.parameters.binary_data if output.parameters is not None else None
        out.append((name, default if flag is None else flag))
    return out


def _unavailable(model: ServedModel, name: str, available: dict[str, Datatype]) -> str:
    kind, _, detector = name.partition("/")
    if detector and kind in DETECTOR_OUTPUTS[model.task]:
        if f"score/{detector}" not in available and detector in model.detectors:
            return f"output {name!r}: detector {detector!r} is not selected by parameters.detectors"
        if kind in NEEDS_CALIBRATION and f"score/{detector}" in available:
            return f"output {name!r} needs a calibrated state: detector {detector!r} has no calibration"
        if kind in NEEDS_THRESHOLD and f"score/{detector}" in available:
            return (
                f"output {name!r} needs a threshold: detector {detector!r} has no calibration, so pass "
                "parameters.threshold"
            )
    shown = ", ".join(list(available)[:12]) + (", ..." if len(available) > 12 else "")
    return f"model {model.name!r} has no output {name[:80]!r}; this request offers: {shown}"
