"""Deep SAD: the formula on a hand-computed case, the mean over all samples, and that training separates
labeled outliers from the center."""

from __future__ import annotations

import pytest
import torch

from ood_core import loss as L


def test_deep_sad_hand_computed() -> None:
    loss = L.DeepSADLoss(2, eta=2.0, eps=1e-6, reduction="none", center=torch.tensor([1.0, 1.0]))
    x = torch.tensor([[1.0, 3.0], [1.0, 1.0], [3.0, 1.0], [1.0, 1.5]])
    y = torch.tensor([0, 1, -1, -1])
    # ID: squared distances 4 and 0; OOD: eta / (d + eps) with d = 4 and d = 0.25
    expected = torch.tensor([4.0, 0.0, 2.0 / (4.0 + 1e-6), 2.0 / (0.25 + 1e-6)])
    torch.testing.assert_close(loss(x, y), expected)
    torch.testing.assert_close(loss.distance(x), torch.tensor([4.0, 0.0, 4.0, 0.25]))
    mean = L.DeepSADLoss(2, eta=2.0, center=torch.tensor([1.0, 1.0]))(x, y)
    torch.testing.assert_close(mean, expected.sum() / 4)  # (n + m) in the paper's normalization


def test_outlier_at_the_center_has_a_finite_loss_and_gradient() -> None:
    loss = L.DeepSADLoss(2, eps=1e-3, center=torch.zeros(2))
    x = torch.zeros(1, 2, requires_grad=True)
    value = loss(x, torch.tensor([-1]))
    value.backward()
    assert torch.isfinite(value) and value.item() == pytest.approx(1e3)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_training_pulls_id_in_and_pushes_labeled_outliers_out() -> None:
    torch.manual_seed(0)
    x_id = torch.randn(64, 5) * 0.5 + 2.0
    x_ood = torch.randn(16, 5) * 0.5 - 2.0
    x, y = torch.cat([x_id, x_ood]), torch.cat([torch.zeros(64, dtype=torch.long), -torch.ones(16, dtype=torch.long)])
    encoder = torch.nn.Linear(5, 3, bias=False)
    with torch.no_grad():
        center = encoder(x_id).mean(dim=0)
    criterion = L.DeepSADLoss(3, center=center)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        criterion(encoder(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        scores = criterion.distance(encoder(x))
    assert scores[64:].min() > scores[:64].max()


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        L.DeepSADLoss(2, center=torch.zeros(3))
    with pytest.raises(ValueError):
        L.DeepSADLoss(2, eta=0.0)
    with pytest.raises(ValueError):
        L.DeepSADLoss(2)(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
