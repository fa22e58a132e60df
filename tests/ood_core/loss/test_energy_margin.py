"""Hand-computed values of the SCONE energy-margin loss and its multiplier updates."""

from __future__ import annotations

import math

import torch
from torch import nn

from ood_core import loss as L

LN2 = math.log(2.0)


def _phi() -> nn.Linear:
    phi = nn.Linear(1, 1)
    with torch.no_grad():
        phi.weight.fill_(1.0)
        phi.bias.zero_()
    return phi


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_energy_margin_loss_hand_computed() -> None:
    loss = L.EnergyMarginLoss(full_train_loss=1.0, eta=1.0, false_alarm_cutoff=0.05)
    logits = torch.zeros(2, 2)  # logsumexp = log 2
    y = torch.tensor([0, -1])
    in_constraint = _sigmoid(LN2) - 0.05  # active (lambda = 0): w / 2 * c^2
    ce_constraint = LN2 - 2.0  # inactive: -lambda2^2 / (2 w) = 0
    assert ce_constraint < 0
    expected = 0.0 + _sigmoid(-(LN2 - 1.0)) + 0.5 * in_constraint**2
    torch.testing.assert_close(loss(logits, y, _phi()), torch.tensor(expected))


def test_update_hyperparameters_steps_multipliers() -> None:
    loss = L.EnergyMarginLoss(full_train_loss=1.0, lr_lam=0.5, penalty_mult=2.0)
    batches = [(torch.zeros(3, 2), torch.tensor([0, 1, 0]))]
    loss.update_hyperparameters(lambda x: x, batches, _phi())
    # ID constraint violated: lam += 0.5 * c, weight doubled; CE constraint (log 2 - 2) satisfied: unchanged
    torch.testing.assert_close(loss.lam, torch.tensor(0.5 * (_sigmoid(LN2) - 0.05)))
    torch.testing.assert_close(loss.in_constraint_weight, torch.tensor(2.0))
    torch.testing.assert_close(loss.lam2, torch.tensor(0.0))
    torch.testing.assert_close(loss.ce_constraint_weight, torch.tensor(1.0))
    assert set(loss.state_dict()) == {"lam", "lam2", "in_constraint_weight", "ce_constraint_weight"}


def test_energy_margin_gradient_reaches_logits_and_phi() -> None:
    phi = _phi()
    logits = torch.randn(4, 3, requires_grad=True)
    L.EnergyMarginLoss(full_train_loss=0.1)(logits, torch.tensor([0, 1, -1, -1]), phi).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert phi.weight.grad is not None
