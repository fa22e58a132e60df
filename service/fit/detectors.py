"""An unfitted detector of a named class, wired to a served model's networks (the one way fits build detectors).

Detectors whose constructor takes the classifier's last layer as tensors (pytorch-ood's ``ViM(model, d, w, b)``,
``DICE(model, w, b, p)``) get ``w`` and ``b`` from the model's head for their input kind when the head is a single
``nn.Linear`` (``heads.features: [fc]``) and the hyperparameters do not give them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ood_core.api import Detector, InvalidStateError
from ood_core.state import detector_class
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.states.validate import check_servable, external_modules


def _linear_head(head: nn.Module | None) -> nn.Linear | None:
    if isinstance(head, nn.Linear):
        return head
    parts = [m for m in head.modules() if not list(m.children())] if head is not None else []
    return parts[0] if len(parts) == 1 and isinstance(parts[0], nn.Linear) else None


def head_weights(model: ServedModel, cls: type[Detector], kind: str, hparams: dict[str, Any]) -> dict[str, Tensor]:
    """``{"w", "b"}`` from the model's linear head when ``cls``'s constructor takes them and ``hparams`` lacks them."""
    wanted = [n for n in ("w", "b") if n in inspect.signature(cls.__init__).parameters and n not in hparams]
    if not wanted:
        return {}
    linear = _linear_head(model.heads.get(kind))
    if linear is None:
        raise BadRequestError(
            f"{cls.__name__} needs the classifier's last layer (w, b): configure heads.{kind} as one linear layer"
        )
    weight = linear.weight.detach().float().cpu().clone()
    bias = linear.bias.detach().float().cpu().clone() if linear.bias is not None else torch.zeros(weight.shape[0])
    return {k: v for k, v in {"w": weight, "b": bias}.items() if k in wanted}


def new_detector(model: ServedModel, class_name: str, hparams: dict[str, Any]) -> tuple[Detector, str]:
    """An unfitted detector of ``class_name`` wired to ``model``'s networks and the output kind it consumes;
    400 for an unknown class or bad hyperparameters, 422 for a class the model cannot serve."""
    try:
        cls = detector_class(class_name)
    except InvalidStateError as exc:
        raise BadRequestError(str(exc)) from exc
    kind = check_servable(model, cls)
    modules = external_modules(model, cls, kind)
    try:
        return cls(**modules, **head_weights(model, cls, kind, hparams), **hparams), kind
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"cannot build {class_name} with hparams {hparams}: {exc}") from exc
