"""Fit and calibrate a detector on in-memory network outputs (the demo's fits and the ``/fit`` route's).

Images go through :class:`~service.engine.preprocess.Preprocessor` and :meth:`ServedModel.forward` (the same
preprocessing and forward as scoring); the detector (built by :func:`service.fit.detectors.new_detector`) is fitted
with ``fit_features`` on the output it consumes, then calibrated on held-out ID images
(:class:`~ood_core.calibration.Calibration`, threshold at 95% ID TPR, conformal p-values). The result is a
``save_detector`` state, installed like an upload. The hold-out is :func:`service.fit.holdout.split_calibration`,
stratified by class and seeded, the rule streaming fits (:func:`service.fit.runner.run_fit`) apply to sample keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.calibration import DEFAULT_TPR, Calibration
from ood_core.state import save_detector
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.fit.detectors import new_detector
from service.fit.holdout import split_calibration

__all__ = ["fit_state", "new_detector", "split_calibration"]


def fit_state(
    model: ServedModel,
    class_name: str,
    hparams: dict[str, Any],
    fit_outputs: dict[str, Tensor],
    fit_labels: Tensor | None,
    calibration_outputs: dict[str, Tensor],
    target_tpr: float = DEFAULT_TPR,
) -> bytes:
    """Fit on network outputs (:meth:`ServedModel.forward_chunks` of preprocessed images) and labels, calibrate
    on the outputs of held-out ID images, and return the saved state."""
    detector, kind = new_detector(model, class_name, hparams)
    detector.to(model.device)
    if detector.requires_fit and (model.task == "segmentation" or fit_labels is None):
        raise BadRequestError(f"{class_name} needs fitting on labelled images: not supported for this model")
    if detector.requires_fit and fit_labels is not None:
        outputs = fit_outputs[kind]
        labels = fit_labels.to(outputs.device)
        if bool((labels >= model.dims["logits"]).any()):
            raise BadRequestError(f"labels must be < {model.dims['logits']} (the model's classes) or < 0 for OOD")
        try:
            detector.fit_features(outputs, labels)
        except (ValueError, RuntimeError) as exc:
            raise BadRequestError(f"fitting {class_name} failed: {exc}") from exc
    with torch.no_grad():
        scores = detector.predict_features(calibration_outputs[kind])
    calibration = Calibration.from_scores(scores.float().cpu(), target_tpr=target_tpr)
    return save_detector(detector, calibration=calibration)
