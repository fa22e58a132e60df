"""ODIN: temperature scaling plus a small adversarial input perturbation towards the predicted class.

Liang, Li, Srikant: "Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks",
ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from ood_core.api import Detector
from ood_core.errors import ModelNotSetException

Criterion = Callable[[Tensor, Tensor], Tensor]


def _nll_of_tempered_softmax(scaled_logits: Tensor, target: Tensor) -> Tensor:
    """Default criterion: summed negative log-likelihood of ``target`` under ``softmax(scaled_logits)``."""
    return F.cross_entropy(scaled_logits, target, reduction="sum")


def odin_preprocessing(
    model: Callable[[Tensor], Tensor] | None,
    x: Tensor,
    y: Tensor | None = None,
    criterion: Criterion | None = None,
    eps: float = 0.05,
    temperature: float = 1000,
    norm_std: Sequence[float] | None = None,
) -> Tensor:
    r"""Functional ODIN input preprocessing:

    .. math:: \hat x = x - \epsilon\, \operatorname{sign}\left(\nabla_x \mathcal{L}(f(x) / T, \hat y)\right)

    :param model: network to backpropagate through (its parameters' ``.grad`` are left untouched)
    :param x: inputs (``B x ...``); the model may return ``B x C`` or ``B x C x H x W`` logits
    :param y: target :math:`\hat y`; ``None`` uses the model's prediction (argmax over dim 1)
    :param criterion: loss :math:`\mathcal{L}(\text{logits}, y)`; ``None`` uses the negative log-likelihood of the
        softmax (cross-entropy), as in the paper. pytorch-ood passes the scaled logits straight to ``nll_loss``
        (i.e. :math:`-f_{\hat y}(x)/T`, no log-softmax); pass ``criterion=torch.nn.functional.nll_loss`` for that.
    :param eps: step size :math:`\epsilon`
    :param temperature: temperature :math:`T`
    :param norm_std: per-channel standard deviations of the input normalization; the gradient sign of channel
        ``c`` is divided by ``norm_std[c]`` so the step is :math:`\epsilon` in un-normalized pixel units
    :return: the perturbed inputs :math:`\hat x` (detached)
    """
    if model is None:
        raise ModelNotSetException("odin_preprocessing needs a model to backpropagate through")
    loss_fn = criterion if criterion is not None else _nll_of_tempered_softmax
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        logits = model(x_in) / temperature
        target = logits.argmax(dim=1).detach() if y is None else y.to(logits.device)
        (gradient,) = torch.autograd.grad(loss_fn(logits, target), x_in)
    step = gradient.sign()
    if norm_std is not None:
        std = torch.as_tensor(list(norm_std), dtype=step.dtype, device=step.device)
        step = step / std.reshape((1, -1) + (1,) * (step.dim() - 2))
    return (x.detach() - eps * step).detach()


class ODIN(Detector):
    r"""Outlier score = negative maximum tempered softmax probability of the ODIN-preprocessed input:

    .. math:: -\max_y \sigma_y\left(f(\hat x) / T\right), \qquad
        \hat x = x - \epsilon\, \operatorname{sign}\left(\nabla_x \mathcal{L}(f(x) / T, \hat y)\right)

    with :math:`\hat y` the predicted class (see :func:`odin_preprocessing`). The score uses the tempered
    softmax :math:`S(\hat x; T)` as in the paper; pytorch-ood scores ``softmax(f(x_hat))`` at temperature 1
    instead. Needs two forward and one backward pass, so it cannot score pre-computed features:
    :meth:`predict_features` raises :class:`~ood_core.errors.FeaturesNotSupportedError`. For segmentation models
    (``B x C x H x W`` logits) the scores are ``B x H x W``. Needs no fitting; the state is the
    hyperparameters only (a custom ``criterion`` cannot be saved).

    :param model: network to backpropagate through, outputs logits
    :param criterion: loss :math:`\mathcal{L}`; ``None`` = negative log-likelihood of the tempered softmax
    :param eps: step size :math:`\epsilon` of the input perturbation
    :param temperature: temperature :math:`T`
    :param norm_std: per-channel standard deviations used to normalize the inputs
    """

    input_kind = "input"
    supports_segmentation = True

    def __init__(
        self,
        model: Any = None,
        criterion: Criterion | None = None,
        eps: float = 0.05,
        temperature: float = 1000.0,
        norm_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        if float(temperature) <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self._custom_criterion = criterion is not None
        self.criterion: Criterion = criterion if criterion is not None else _nll_of_tempered_softmax
        self.eps = float(eps)
        self.temperature = float(temperature)
        self.norm_std = None if norm_std is None else [float(s) for s in norm_std]

    def hparams(self) -> dict[str, Any]:
        params: dict[str, Any] = {"eps": self.eps, "temperature": self.temperature, "norm_std": self.norm_std}
        if self._custom_criterion:  # not JSON: save_detector refuses it with a clear ValueError
            params["criterion"] = self.criterion
        return params

    def predict(self, x: Tensor) -> Tensor:
        """:param x: inputs; they are perturbed, then passed through the model again"""
        model = self._require("model")
        x_hat = odin_preprocessing(
            model, x, criterion=self.criterion, eps=self.eps, temperature=self.temperature, norm_std=self.norm_std
        )
        with torch.no_grad():
            return -(model(x_hat) / self.temperature).softmax(dim=1).amax(dim=1)
