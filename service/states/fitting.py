"""Fit and calibrate a detector through the served model (the same preprocessing and forward as scoring).

Images go through :class:`~service.engine.preprocess.Preprocessor` and :meth:`ServedModel.forward`; the detector is
fitted with ``fit_features`` on the output it consumes, then calibrated on held-out ID images
(:class:`~ood_core.calibration.Calibration`, threshold at 95% ID TPR, conformal p-values). The result is a
``save_detector`` state, installed like an upload.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError
from ood_core.calibration import DEFAULT_TPR, Calibration
from ood_core.state import detector_class, save_detector
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.states.validate import check_servable, external_modules


def split_calibration(labels: Tensor, share: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, calibration)``: a seeded ``share`` of the ID images (label >= 0) is held out for
    calibration; OOD-labelled images stay in the fit set (detectors ignore them where pytorch-ood does)."""
    generator = torch.Generator().manual_seed(seed)
    id_index = torch.nonzero(labels >= 0).flatten()
    order = id_index[torch.randperm(id_index.numel(), generator=generator)]
    n_cal = int(round(share * id_index.numel()))
    if n_cal < 1 or n_cal >= id_index.numel():
        raise BadRequestError(
            f"cannot hold out {share:.0%} of {id_index.numel()} ID images for calibration: need at least one "
            "image on each side"
        )
    calibration = torch.sort(order[:n_cal]).values
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[calibration] = False
    return torch.nonzero(keep).flatten(), calibration


def new_detector(model: ServedModel, class_name: str, hparams: dict[str, Any]) -> tuple[Detector, str]:
    """An unfitted detector of ``class_name`` wired to ``model``'s networks; raise 400/422 if impossible."""
    try:
        cls = detector_class(class_name)
    except InvalidStateError as exc:
        raise BadRequestError(str(exc)) from exc
    kind = check_servable(model, cls)
    modules = external_modules(model, cls, kind)
    try:
        return cls(**modules, **hparams), kind
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"cannot build {class_name} with hparams {hparams}: {exc}") from exc


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
