"""GradUncertainty: the squared norm of the gradients of a "confounding label" loss w.r.t. the parameters.

Lee, AlRegib: "Gradients as a Measure of Uncertainty in Neural Networks", ICIP 2020.

Also holds what it shares with :class:`~ood_core.detector.GradNorm`: choosing the parameters
(:func:`select_parameters`) and per-sample gradient norms in one batched pass (:func:`per_sample_gradient_norms`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ood_core.api import Detector

#: ``None`` (every parameter), a callable ``name -> bool`` (pytorch-ood), or parameter / module names (saved with
#: the state): a name selects the parameter of that name and every parameter below a module of that name
ParamFilter = Callable[[str], bool] | Sequence[str] | str | None


def check_param_filter(param_filter: Any) -> Any:
    """``param_filter`` as stored: ``None``, a callable, or a list of names (a single name becomes a list)."""
    if param_filter is None or callable(param_filter):
        return param_filter
    names = [param_filter] if isinstance(param_filter, str) else list(param_filter)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("param_filter must be a callable, or a non-empty list of parameter or module names")
    return names


def select_parameters(model: Any, param_filter: Any, owner: str) -> dict[str, Tensor]:
    """The model's named parameters that ``param_filter`` selects (see :data:`ParamFilter`); ``ValueError`` when
    it selects none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner} needs an nn.Module model (its parameters are differentiated)")
    named: dict[str, Tensor] = dict(model.named_parameters())
    if param_filter is None:
        selected = named
    elif callable(param_filter):
        selected = {n: p for n, p in named.items() if param_filter(n)}
    else:
        selected = {n: p for n, p in named.items() if any(n == f or n.startswith(f + ".") for f in param_filter)}
    if not selected:
        raise ValueError(f"{owner}: param_filter selects none of the parameters of the model")
    return selected


def per_sample_gradient_norms(
    model: nn.Module,
    x: Tensor,
    loss: Callable[[Tensor], Tensor],
    selected: dict[str, Tensor],
    power: int,
    micro_batch_size: int,
) -> Tensor:
    r"""Per sample :math:`i`, :math:`\sum_w \lVert \partial \mathcal L(f(x_i)) / \partial w \rVert_q^q` over the
    ``selected`` parameters (``q`` = ``power``: 1 or 2), with ``loss`` applied to the ``1 x C`` logits of one
    sample.

    The per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))`` over chunks of at most
    ``micro_batch_size`` samples (one batched forward and backward each; peak memory grows with the chunk, not
    the batch). Only the selected parameters are differentiated; the model's ``.grad`` fields are untouched.
    Works inside ``torch.no_grad()`` / ``torch.inference_mode()`` (gradients are enabled here). Returns ``B``
    float32 values on ``x``'s device.
    """
    params = {n: p.detach() for n, p in selected.items()}
    constants: dict[str, Tensor] = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    constants.update(dict(model.named_buffers()))

    def sample_loss(weights: dict[str, Tensor], sample: Tensor) -> Tensor:
        return loss(functional_call(model, {**weights, **constants}, (sample.unsqueeze(0),)))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))
    norms = []
    with torch.inference_mode(False), torch.enable_grad():
        inputs = x.detach().clone() if x.is_inference() else x.detach()
        for chunk in inputs.split(micro_batch_size):
            grads = per_sample(params, chunk)
            total = torch.zeros(chunk.shape[0], dtype=torch.float32, device=chunk.device)
            for g in grads.values():
                flat = g.detach().reshape(g.shape[0], -1).float()
                total += flat.abs().sum(1) if power == 1 else (flat * flat).sum(1)
            norms.append(total)
    return torch.cat(norms) if norms else torch.zeros(0, device=x.device)


def confounding_label_loss(logits: Tensor) -> Tensor:
    r"""Binary cross-entropy of the softmax output against the all-ones label, summed over classes:
    :math:`-\sum_c \log \sigma_c(z)` (from log-softmax: exact where ``binary_cross_entropy`` of the probabilities
    would clamp at :math:`p = 1` or :math:`\log p = -100`). Its gradient w.r.t. the logits is :math:`C p - 1`."""
    return -logits.log_softmax(dim=1).sum()


class ParameterGradientDetector(Detector):
    """Base of :class:`GradUncertainty` and :class:`~ood_core.detector.GradNorm`: minus a per-sample norm of the
    gradients of :meth:`loss` w.r.t. the parameters ``param_filter`` selects. No fit; the network in the loop
    (``input_kind = "input"``). Subclasses set :attr:`power` and implement :meth:`loss`."""

    input_kind = "input"
    #: the norm :math:`q` of the score (:math:`\lVert\cdot\rVert_q^q`)
    power: ClassVar[int] = 2
    #: samples per batched forward + backward (bounds peak memory)
    micro_batch_size = 32

    def __init__(self, model: nn.Module | None, param_filter: ParamFilter = None) -> None:
        super().__init__()
        self.model = model
        self.param_filter = check_param_filter(param_filter)
        if model is not None:
            select_parameters(model, self.param_filter, type(self).__name__)

    def hparams(self) -> dict[str, Any]:
        return {"param_filter": self.param_filter}  # a callable is not JSON: save_detector refuses it

    def loss(self, logits: Tensor) -> Tensor:
        """The loss of one sample's ``1 x C`` logits."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """:param x: inputs (``B x ...``), each passed forward and backward through the model; returns ``B`` scores"""
        model = self._require("model")
        selected = select_parameters(model, self.param_filter, type(self).__name__)
        norms = per_sample_gradient_norms(
            model,  # type: ignore[arg-type]
            x,
            self.loss,
            selected,
            self.power,
            self.micro_batch_size,
        )
        return -norms


class GradUncertainty(ParameterGradientDetector):
    r"""Outlier score = minus the squared :math:`\ell_2` norm of the gradients of the confounding-label loss
    w.r.t. the selected parameters:

    .. math:: s(x) = -\sum_{w} \left\lVert \frac{\partial \mathcal L(x)}{\partial w} \right\rVert_2^2, \qquad
        \mathcal L(x) = \mathrm{BCE}(\sigma(f(x)), \mathbf 1) = -\sum_{c=1}^{C} \log \sigma_c(f(x))

    (Lee & AlRegib 2020). The gradient w.r.t. the logits, :math:`C\sigma(f(x)) - 1`, vanishes for a uniform
    prediction and grows with its confidence, so familiar (ID) inputs have larger norms; the sign is flipped so
    that OOD scores higher. As in pytorch-ood, the norms are summed into one score (the paper trains a
    classifier on the per-layer norms with OOD data). Per-sample gradients are computed in batches (see
    :func:`per_sample_gradient_norms`); the model is used in its current mode (call ``model.eval()`` first).
    Needs the network in the loop (``input_kind = "input"``) and no fit.

    :param model: classifier returning ``B x C`` logits
    :param param_filter: which parameters :math:`w`: ``None`` (all), a callable ``name -> bool``, or a list of
        parameter / module names (e.g. ``["fc"]``, the paper's cheaper variant; a list is saved with the state,
        a callable cannot be)
    """

    power = 2

    def loss(self, logits: Tensor) -> Tensor:
        """:func:`confounding_label_loss`"""
        return confounding_label_loss(logits)
