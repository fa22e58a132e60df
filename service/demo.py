"""The embedded demo: the digits classifier (``digits``) and segmenter (``digits-seg``) from :mod:`ood_core.zoo`,
with detectors fitted on the digits ``train`` split and calibrated on the ``calibration`` split (segmenter: ID-only
mosaics of those splits) on first start, through the served preprocessing, then stored like uploads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import Tensor

from service.engine.served_model import ServedModel
from service.settings import HeadsConfig, ModelConfig, NodesConfig, PreprocessConfig
from service.states.fitting import fit_state
from service.states.manager import StateManager

logger = logging.getLogger("service.demo")

CLASSIFIER = "digits"
SEGMENTER = "digits-seg"
SEGMENTATION_FIT_MOSAICS = 64
"""ID mosaics per split used to calibrate the segmenter's detectors (64 x 4096 pixel scores)."""

DEMO_DETECTORS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    CLASSIFIER: [
        ("mahalanobis", "Mahalanobis", {}),
        ("knn", "KNN", {"k": 10}),
        ("msp", "MaxSoftmax", {}),
        ("energy", "EnergyBased", {}),
    ],
    SEGMENTER: [
        ("energy", "EnergyBased", {}),
        ("entropy", "Entropy", {}),
        ("maxlogit", "MaxLogit", {}),
    ],
}
"""model -> [(detector name, class, hyperparameters)]. The first is the demo's default (the one the docs and tests
use): on the digits classifier Mahalanobis separates ID test digits from noise and photo crops almost perfectly
(AUROC ~1.0) while energy ranks uniform noise as MORE in-distribution than digits (AUROC ~0.02)."""
DEFAULT_DETECTOR = {CLASSIFIER: "mahalanobis", SEGMENTER: "energy"}


def demo_model_configs() -> list[ModelConfig]:
    from ood_core.zoo import DIGITS_MEAN, DIGITS_STD

    preprocessing = PreprocessConfig(mode="L", mean=[DIGITS_MEAN], std=[DIGITS_STD])
    return [
        ModelConfig(
            name=CLASSIFIER,
            source="zoo",
            architecture="digits-classifier",
            task="classification",
            num_classes=6,
            labels=[str(d) for d in range(6)],
            input_size=(32, 32),
            preprocessing=preprocessing,
            nodes=NodesConfig(logits="fc", features="pool", feature_maps="body"),
            heads=HeadsConfig(features=["fc"], feature_maps=["pool", "fc"]),
        ),
        ModelConfig(
            name=SEGMENTER,
            source="zoo",
            architecture="digits-segmenter",
            task="segmentation",
            num_classes=7,
            labels=["background", *(str(d) for d in range(6))],
            input_size=(64, 64),
            preprocessing=preprocessing,
            nodes=NodesConfig(logits="upsample", feature_maps="body"),
        ),
    ]


def _demo_data(model: ServedModel) -> tuple[Tensor, Tensor | None, Tensor]:
    """(fit images, fit labels, calibration images) as float [0, 1] tensors."""
    if model.task == "classification":
        from ood_core.data import load_split

        fit_x, fit_y = load_split("train")
        cal_x, _ = load_split("calibration")
        return fit_x, fit_y, cal_x
    from ood_core.data import make_mosaics

    fit_x, _ = make_mosaics(SEGMENTATION_FIT_MOSAICS, ood_share=0.0, split="train")
    cal_x, _ = make_mosaics(SEGMENTATION_FIT_MOSAICS, ood_share=0.0, split="calibration")
    return fit_x, None, cal_x


def ensure_demo_detectors(states: StateManager, model: ServedModel) -> None:
    """Fit, calibrate and store the demo detectors the state directory does not hold yet (blocking)."""
    wanted = [spec for spec in DEMO_DETECTORS.get(model.name, []) if spec[0] not in model.detectors]
    if not wanted:
        return
    started = time.perf_counter()
    fit_x, fit_y, cal_x = _demo_data(model)
    fit_outputs = model.forward_chunks(model.preprocessor.pixels_from_tensor(fit_x))
    cal_outputs = model.forward_chunks(model.preprocessor.pixels_from_tensor(cal_x))
    for name, class_name, hparams in wanted:
        try:
            data = fit_state(model, class_name, hparams, fit_outputs, fit_y, cal_outputs)
            states.install(model, name, data)
        except Exception:
            logger.exception("cannot fit demo detector", extra={"model": model.name, "detector": name})
    logger.info(
        "demo detectors fitted",
        extra={
            "model": model.name,
            "detectors": [w[0] for w in wanted],
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
