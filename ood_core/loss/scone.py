"""Energy-margin loss of SCONE (Bai, Canal, Du, Kwon, Nowak, Li, "Feed Two Birds with One Scone: Exploiting
Wild Data for Both Out-of-Distribution Generalization and Detection", ICML 2023), trained with the
augmented Lagrangian method of WOODS (Katz-Samuels et al., ICML 2022)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mean_or_zero(values: Tensor) -> Tensor:
    return values.mean() if values.numel() else values.sum() * 0.0


def _alm_penalty(constraint: Tensor, weight: Tensor, lam: Tensor) -> Tensor:
    """Augmented-Lagrangian penalty :math:`\\psi(c) = \\lambda c + \\frac{w}{2} c^2` if
    :math:`w c + \\lambda \\geq 0`, else :math:`-\\lambda^2 / (2 w)`."""
    active = lam * constraint + weight / 2 * constraint.pow(2)
    return torch.where(weight * constraint + lam >= 0, active, -lam.pow(2) / (2 * weight))


class EnergyMarginLoss(nn.Module):
    """Constrained objective of SCONE, as an augmented Lagrangian:

    .. math::
        \\mathcal{L} = \\psi_2(\\mathrm{CE}_{in} - \\tau \\cdot \\ell_{full}) + \\lambda_{out}
        \\mathbb{E}_{out}\\big[\\sigma(-\\phi(\\mathrm{LSE}(f(x)) - \\eta))\\big]
        + \\psi_1\\big(\\mathbb{E}_{in}[\\sigma(\\phi(\\mathrm{LSE}(f(x))))] - \\beta\\big)

    where :math:`\\mathrm{LSE} = \\log\\sum_i e^{f_i}` (negative energy), :math:`\\phi` a logistic regression
    (``Linear(1, 1)``), :math:`\\eta` the margin that pushes OOD energies above the ID ones, :math:`\\beta` the
    false alarm cutoff, :math:`\\tau` the CE tolerance and :math:`\\psi_{1,2}` the penalties of
    :func:`_alm_penalty` with multipliers :math:`\\lambda, \\lambda_2` (buffers ``lam``, ``lam2``) updated by
    :meth:`update_hyperparameters` once per epoch. ID = labels ``>= 0``, OOD = labels ``< 0``; the
    expectations are batch means (an empty part contributes 0). Classification only; returns a scalar.

    :param full_train_loss: average classification loss of the pre-trained model :math:`\\ell_{full}`
    :param eta: margin :math:`\\eta` between ID and OOD
    :param false_alarm_cutoff: :math:`\\beta`
    :param in_constraint_weight: penalty weight of the ID constraint
    :param ce_tol: :math:`\\tau`
    :param ce_constraint_weight: penalty weight of the CE constraint
    :param out_constraint_weight: :math:`\\lambda_{out}`
    :param lr_lam: step size of the multiplier updates
    :param penalty_mult: factor applied to a penalty weight whose constraint is violated
    :param constraint_tol: tolerance of a constraint
    """

    lam: Tensor
    lam2: Tensor
    in_constraint_weight: Tensor
    ce_constraint_weight: Tensor

    def __init__(
        self,
        full_train_loss: float,
        eta: float = 1.0,
        false_alarm_cutoff: float = 0.05,
        in_constraint_weight: float = 1.0,
        ce_tol: float = 2.0,
        ce_constraint_weight: float = 1.0,
        out_constraint_weight: float = 1.0,
        lr_lam: float = 1.0,
        penalty_mult: float = 1.5,
        constraint_tol: float = 0.0,
    ) -> None:
        super().__init__()
        self.full_train_loss = float(full_train_loss)
        self.eta = eta
        self.false_alarm_cutoff = false_alarm_cutoff
        self.ce_tol = ce_tol
        self.out_constraint_weight = out_constraint_weight
        self.lr_lam = lr_lam
        self.penalty_mult = penalty_mult
        self.constraint_tol = constraint_tol
        self.register_buffer("lam", torch.tensor(0.0))
        self.register_buffer("lam2", torch.tensor(0.0))
        self.register_buffer("in_constraint_weight", torch.tensor(float(in_constraint_weight)))
        self.register_buffer("ce_constraint_weight", torch.tensor(float(ce_constraint_weight)))

    def _in_sigmoid(self, logits: Tensor, phi: Callable[[Tensor], Tensor]) -> Tensor:
        return torch.sigmoid(phi(torch.logsumexp(logits, dim=1).unsqueeze(1)).squeeze(1))

    def forward(self, logits: Tensor, targets: Tensor, logistic_regression: Callable[[Tensor], Tensor]) -> Tensor:
        """:param logits: ``B x C`` logits; :param targets: labels; :param logistic_regression: :math:`\\phi`"""
        if logits.dim() != 2:
            raise ValueError(f"Unsupported input shape: {tuple(logits.shape)} (classification only)")
        known = targets >= 0
        energy_in = _mean_or_zero(self._in_sigmoid(logits[known], logistic_regression))
        lse_out = torch.logsumexp(logits[~known], dim=1) - self.eta
        energy_out = _mean_or_zero(torch.sigmoid(-logistic_regression(lse_out.unsqueeze(1)).squeeze(1)))
        ce = F.cross_entropy(logits[known], targets[known]) if bool(known.any()) else logits.sum() * 0.0
        loss_in = _alm_penalty(energy_in - self.false_alarm_cutoff, self.in_constraint_weight, self.lam)
        loss_ce = _alm_penalty(ce - self.ce_tol * self.full_train_loss, self.ce_constraint_weight, self.lam2)
        return loss_ce + self.out_constraint_weight * energy_out + loss_in

    @torch.no_grad()
    def update_hyperparameters(
        self,
        model: Callable[[Tensor], Tensor],
        train_loader_in: Iterable[Any],
        logistic_regression: Callable[[Tensor], Tensor],
    ) -> None:
        """Dual step: evaluate the ID constraint terms over ``train_loader_in`` (batches ``(x, y)``), update
        the multipliers and grow the penalty weights of violated constraints."""
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = params[0].device if params else self.lam.device
        sig_sum, ce_sum, count = 0.0, 0.0, 0
        for x, y in train_loader_in:
            logits = model(x.to(device))
            y = y.to(logits.device)
            sig_sum += float(self._in_sigmoid(logits, logistic_regression).sum())
            ce_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            count += int(y.numel())
        if count == 0:
            raise ValueError("train_loader_in yielded no samples")
        in_constraint = sig_sum / count - self.false_alarm_cutoff
        ce_constraint = ce_sum / count - self.ce_tol * self.full_train_loss
        for lam, weight, constraint in (
            (self.lam, self.in_constraint_weight, in_constraint),
            (self.lam2, self.ce_constraint_weight, ce_constraint),
        ):
            if constraint * weight + lam >= 0:
                lam += self.lr_lam * constraint
            else:
                lam -= self.lr_lam * lam / weight
            if constraint > self.constraint_tol:
                weight *= self.penalty_mult
