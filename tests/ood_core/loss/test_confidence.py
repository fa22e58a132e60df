"""Hand-computed values of the learned-confidence loss."""

from __future__ import annotations

import math

import torch

from ood_core import loss as L


def test_confidence_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [1.0, 2.0]])
    confidence = torch.tensor([[0.5], [1.0], [0.1]])
    y = torch.tensor([0, 1, -1])
    # p'_y = c p_y + 1 - c: 0.5 * 0.5 + 0.5 = 0.75; 1 * 0.75 + 0 = 0.75
    sample1 = -math.log(0.75) - 2.0 * math.log(0.5)
    sample2 = -math.log(0.75) - 2.0 * math.log(1.0)
    value = L.ConfidenceLoss(alpha=2.0)(logits, confidence, y)
    torch.testing.assert_close(value, torch.tensor((sample1 + sample2) / 2))


def test_low_confidence_helps_wrong_predictions_and_costs_on_right_ones() -> None:
    loss = L.ConfidenceLoss(alpha=0.1)
    wrong = torch.tensor([[5.0, -5.0]])
    y = torch.tensor([1])
    assert loss(wrong, torch.tensor([0.1]), y) < loss(wrong, torch.tensor([1.0]), y)
    right = torch.tensor([[-5.0, 5.0]])
    assert loss(right, torch.tensor([1.0]), y) < loss(right, torch.tensor([0.1]), y)


def test_confidence_loss_segmentation() -> None:
    logits = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    conf = torch.rand(2, 1, 4, 4)
    flat = L.ConfidenceLoss()(logits.movedim(1, -1).reshape(-1, 3), conf.reshape(-1), y.reshape(-1))
    torch.testing.assert_close(L.ConfidenceLoss()(logits, conf, y), flat)
