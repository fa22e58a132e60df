"""ISH: Intermediate Tensor SHaping (Xu, Chen, Franchi, Yao, "Scaling for Training Time and Post-hoc
Out-of-distribution Detection Enhancement", ICLR 2024).

ISH changes only how a linear layer's *weight gradient* is computed during training. For a sample with
input activations :math:`a \\in \\mathbb{R}^n`, keep the :math:`k = n - \\mathrm{round}(p\\, n)` entries of
largest magnitude (at least one), zero the rest, and scale what is kept by :math:`\\exp(s_1 / s_2)`:

.. math::
    \\tilde a = e^{s_1 / s_2} \\cdot a \\odot m, \\qquad s_1 = \\sum_j a_j, \\quad s_2 = \\sum_j a_j m_j,
    \\qquad \\frac{\\partial \\mathcal{L}}{\\partial W} = \\sum_{\\text{samples}} g\\, \\tilde a^\\top

where :math:`m` is the top-:math:`k` mask and :math:`g = \\partial \\mathcal{L} / \\partial y` the output
gradient. Samples whose activations are pruned more (a larger share of their mass outside the top-k,
typical for ID samples) get a larger weight update, which is the scaling idea of SCALE moved into
training.

Choices (documented because the paper describes the method in words):

- **Forward is unchanged** (``F.linear``), so predictions, the loss and all other gradients are those of the
  plain layer. The shaped tensor only replaces the *saved* activation used for the weight gradient, as in
  the authors' OpenOOD implementation (which stores just the sparse top-k part to save memory).
- **Input gradient** :math:`g W` and **bias gradient** :math:`\\sum g` stay the ordinary ones: the paper
  shapes the intermediate tensor kept for the weight update only, and the bias gradient does not involve
  the activations. Changing the input gradient would alter the training signal of every earlier layer.
- **Signs**: the paper applies ISH to post-ReLU (non-negative) features, where magnitude = value and
  :math:`s_2 > 0`. For inputs with negative entries we still rank by magnitude and keep the signed values
  (so the gradient is that of the pruned input), and define :math:`s_1, s_2` on magnitudes so that the ratio
  is always defined and :math:`\\geq 1`; for non-negative inputs this is exactly the paper's formula. (The
  OpenOOD code stores the absolute values of the kept entries.) A sample whose activations are all zero
  gets scale 1 (its weight-gradient contribution is zero anyway).
- **Sample**: each index of the first axis; inputs ``B x ... x n`` are flattened per sample over all but the
  first axis (as in the authors' code), so for ``B x n`` inputs a sample is a row.
- ISH is active only in training mode with gradients enabled; ``eval()`` gives the plain layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kept_count(n: int, p: float) -> int:
    """Number of activations kept per sample: :math:`n - \\mathrm{round}(p\\, n)`, at least 1."""
    return max(1, n - int(round(p * n)))


def shape_activations(x: Tensor, p: float) -> Tensor:
    """The shaped tensor :math:`\\tilde a = e^{s_1/s_2} \\cdot a \\odot m` of ``x`` (same shape), per sample
    (first axis): top-:math:`(1-p)` entries by magnitude kept, :math:`s_1, s_2` the magnitude sums of all and
    of the kept entries."""
    flat = x.reshape(x.shape[0], -1)
    magnitude = flat.abs()
    top = magnitude.topk(kept_count(flat.shape[1], p), dim=1)
    s1 = magnitude.sum(dim=1)
    s2 = top.values.sum(dim=1)
    ratio = torch.where(s2 > 0, s1 / s2.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(s1))
    kept = torch.zeros_like(flat).scatter(1, top.indices, flat.gather(1, top.indices))
    return (kept * torch.exp(ratio).unsqueeze(1)).reshape(x.shape)


class _ISHLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with the weight gradient taken from the shaped input (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, p: float) -> Tensor:
        shaped = shape_activations(x.detach(), p) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(shaped, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        shaped, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = grad_output.reshape(-1, weight.shape[0]).T @ shaped.reshape(-1, weight.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, weight.shape[0]).sum(dim=0)
        return grad_input, grad_weight, grad_bias, None


def ish_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, p: float = 0.85) -> Tensor:
    """Functional form: ``F.linear(x, weight, bias)`` whose weight gradient is shaped by ISH."""
    return _ISHLinearFunction.apply(x, weight, bias, p)  # type: ignore[no-any-return]


class ISHLinear(nn.Linear):
    """A linear layer trained with ISH, sharing the parameters of the layer it wraps.

    It *is* an ``nn.Linear`` (same ``weight``/``bias`` objects and ``state_dict`` keys), so it can replace
    ``model.fc`` in place; optimizers built before wrapping keep working.

    :param linear: the layer to wrap
    :param p: pruning percentile :math:`p \\in [0, 1)` (share of activations dropped; 0.85 in the paper)
    """

    def __init__(self, linear: nn.Linear, p: float = 0.85) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return ish_linear(x, self.weight, self.bias, self.p)
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def ish(linear: nn.Linear, p: float = 0.85) -> ISHLinear:
    """Wrap ``linear`` for ISH training (see :class:`ISHLinear`)."""
    return ISHLinear(linear, p)
