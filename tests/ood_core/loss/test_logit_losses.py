"""Hand-computed values of the logit-based losses (CE, LogitNorm, OE, entropic, objectosphere, energy,
background class) and the property each one is for."""

from __future__ import annotations

import math

import pytest
import torch

from ood_core import loss as L

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_cross_entropy_hand_computed_and_mean_over_id_only() -> None:
    logits = torch.tensor([[LN3, 0.0], [0.0, 0.0], [5.0, -5.0]])
    y = torch.tensor([0, 1, -1])
    # softmax([ln3, 0]) = [3/4, 1/4]; softmax([0, 0]) = [1/2, 1/2]
    expected = torch.tensor([math.log(4 / 3), LN2, 0.0])
    torch.testing.assert_close(L.CrossEntropyLoss(reduction="none")(logits, y), expected)
    torch.testing.assert_close(L.CrossEntropyLoss()(logits, y), torch.tensor((math.log(4 / 3) + LN2) / 2))


def test_logit_norm_hand_computed() -> None:
    logits = torch.tensor([[3.0, 4.0]])  # norm 5 -> normalized [0.6, 0.8], t = 0.5 -> [1.2, 1.6]
    value = L.LogitNorm(t=0.5)(logits, torch.tensor([1]))
    expected = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    torch.testing.assert_close(value, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_logit_norm_is_invariant_to_logit_scale() -> None:
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    loss = L.LogitNorm(t=0.1)
    torch.testing.assert_close(loss(logits, y), loss(7.0 * logits, y), atol=1e-5, rtol=1e-5)


def test_outlier_exposure_hand_computed() -> None:
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    y = torch.tensor([1, -1])
    # ID: -log(3/4); OOD: alpha * (log(1 + 3) - (0 + ln3) / 2)
    expected = torch.tensor([math.log(4 / 3), 0.5 * (math.log(4.0) - LN3 / 2)])
    torch.testing.assert_close(L.OutlierExposureLoss(alpha=0.5, reduction="none")(logits, y), expected)


def test_outlier_exposure_is_minimal_for_uniform_ood_logits() -> None:
    loss = L.OutlierExposureLoss(alpha=1.0, reduction="none")
    y = torch.tensor([-1])
    uniform = loss(torch.full((1, 4), 2.5), y)
    torch.testing.assert_close(uniform, torch.tensor([math.log(4.0)]))  # cross-entropy to uniform = log C
    for _ in range(20):
        assert loss(torch.randn(1, 4) * 3, y) > uniform
    # and gradient descent on OOD logits drives them to uniform
    logits = torch.randn(1, 4, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(200):
        optimizer.zero_grad()
        loss(logits, y).sum().backward()
        optimizer.step()
    assert torch.softmax(logits, 1).sub(0.25).abs().max() < 1e-3


def test_entropic_open_set_hand_computed() -> None:
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    y = torch.tensor([0, -1])
    # ID: -log(1/4); OOD: -(log(1/4) + log(3/4)) / 2
    expected = torch.tensor([math.log(4.0), -(math.log(0.25) + math.log(0.75)) / 2])
    torch.testing.assert_close(L.EntropicOpenSetLoss(reduction="none")(logits, y), expected)


def test_entropic_ood_term_prefers_high_entropy() -> None:
    loss = L.EntropicOpenSetLoss(reduction="none")
    y = torch.tensor([-1])
    assert loss(torch.zeros(1, 3), y) < loss(torch.tensor([[3.0, 0.0, 0.0]]), y)


def test_objectosphere_hand_computed() -> None:
    logits = torch.zeros(3, 2)  # entropic term: log 2 for every entry
    features = torch.tensor([[0.3, 0.4], [3.0, 4.0], [0.3, 0.4]])  # norms 0.5, 5, 0.5
    y = torch.tensor([0, 1, -1])
    # ID: (xi - |F|)^+ ^2 = (1 - 0.5)^2, (1 - 5)^+ = 0; OOD: |F|^2 = 0.25; alpha = 2
    expected = torch.tensor([LN2 + 2 * 0.25, LN2, LN2 + 2 * 0.25])
    value = L.ObjectosphereLoss(alpha=2.0, xi=1.0, reduction="none")(logits, features, y)
    torch.testing.assert_close(value, expected)


def test_objectosphere_score_orders_by_confidence_times_magnitude() -> None:
    scores = L.ObjectosphereLoss.score(torch.tensor([[10.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    assert scores[0] < scores[1] < scores[2] <= 0


def test_energy_regularized_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # E = -log 2
    y = torch.tensor([0, -1])
    loss = L.EnergyRegularizedLoss(alpha=0.5, margin_in=-2.0, margin_out=0.0, reduction="none")
    # ID: CE log 2 + 0.5 * (-log2 + 2)^2; OOD: 0.5 * (0 + log 2)^2
    expected = torch.tensor([LN2 + 0.5 * (2 - LN2) ** 2, 0.5 * LN2**2])
    torch.testing.assert_close(loss(logits, y), expected)


def test_energy_regularizer_vanishes_inside_the_margins() -> None:
    loss = L.EnergyRegularizedLoss(alpha=1.0, margin_in=-5.0, margin_out=-1.0, reduction="none")
    id_logits = torch.tensor([[10.0, 0.0]])  # E ~ -10 < m_in: only CE remains
    ood_logits = torch.tensor([[-5.0, -5.0]])  # E ~ 4.3 > m_out: zero
    torch.testing.assert_close(
        loss(id_logits, torch.tensor([0])), L.CrossEntropyLoss("none")(id_logits, torch.tensor([0]))
    )
    assert loss(ood_logits, torch.tensor([-1])).item() == 0.0


def test_background_class_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0, LN2], [0.0, 0.0, LN2]])  # softmax [1/4, 1/4, 1/2]
    y = torch.tensor([1, -3])
    expected = torch.tensor([math.log(4.0), LN2])  # OOD -> class 2
    torch.testing.assert_close(L.BackgroundClassLoss(2, reduction="none")(logits, y), expected)


def test_background_class_loss_teaches_ood_to_the_extra_class() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    L.BackgroundClassLoss(2)(logits, torch.tensor([-1, 0])).backward()
    assert logits.grad is not None
    assert logits.grad[0, 2] < 0 and (logits.grad[0, :2] > 0).all()  # descent raises the OOD row's background logit
    assert logits.grad[1, 0] < 0 and (logits.grad[1, 1:] > 0).all()  # and the ID row's own class
    with pytest.raises(ValueError, match="3 logit channels"):
        L.BackgroundClassLoss(2)(torch.zeros(2, 2), torch.tensor([0, -1]))


def test_energy_mean_averages_id_and_ood_terms_over_their_own_samples() -> None:
    loss = L.EnergyRegularizedLoss(alpha=0.5, margin_in=-2.0, margin_out=0.0)
    logits = torch.zeros(4, 2)  # E = -log 2 everywhere
    y = torch.tensor([0, 1, 1, -1])  # three ID samples, one OOD sample
    id_term = LN2 + 0.5 * (2 - LN2) ** 2  # same for every ID sample
    ood_term = 0.5 * LN2**2
    # E_in[...] + E_out[...]: the OOD term keeps its full weight although it is a quarter of the batch
    torch.testing.assert_close(loss(logits, y), torch.tensor(id_term + ood_term))
    # so the loss does not change with the share of OOD samples in the batch
    more_id = torch.tensor([0, 1, 1, 0, 0, 1, -1, -1])
    torch.testing.assert_close(loss(torch.zeros(8, 2), more_id), torch.tensor(id_term + ood_term))
    # a batch without OOD samples has only the ID expectation
    torch.testing.assert_close(loss(logits[:3], y[:3]), torch.tensor(id_term))


def test_energy_mean_on_segmentation_pools_pixels_per_group() -> None:
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(2, 3, 4, 4, generator=g), torch.randint(-1, 3, (2, 4, 4), generator=g)
    loss = L.EnergyRegularizedLoss(alpha=0.3, margin_in=-3.0, margin_out=-0.5)
    per_pixel = L.EnergyRegularizedLoss(alpha=0.3, margin_in=-3.0, margin_out=-0.5, reduction="none")(logits, y)
    torch.testing.assert_close(loss(logits, y), per_pixel[y >= 0].mean() + per_pixel[y < 0].mean())


def test_logit_norm_loss_functional_matches_module_and_drops_ood() -> None:
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(6, 4, generator=g), torch.tensor([0, 3, -1, 2, -1, 1])
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            L.logit_norm_loss(logits, y, t=0.2, reduction=reduction), L.LogitNorm(0.2, reduction)(logits, y)
        )
    # OOD rows are dropped: the mean equals the loss on the ID rows alone
    torch.testing.assert_close(L.logit_norm_loss(logits, y, 0.2), L.logit_norm_loss(logits[y >= 0], y[y >= 0], 0.2))
    empty = L.logit_norm_loss(logits[y < 0].requires_grad_(), y[y < 0])
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError):
        L.logit_norm_loss(logits, y, t=0.0)


def test_seed_style_calls_run_unchanged() -> None:
    """The signatures and calls of the seed's training-objectives reference (003)."""
    logits, targets = torch.randn(8, 10, requires_grad=True), torch.tensor([0, 1, 2, 3, -1, -1, 4, 5])
    energy = L.EnergyRegularizedLoss(alpha=1.0, margin_in=-1.0, margin_out=-1.0, reduction="mean")
    logit_norm = L.LogitNorm(t=1.0, reduction="mean")
    total = energy(logits, targets) + logit_norm(logits, targets)
    total.backward()
    assert total.shape == () and logits.grad is not None
    assert L.EnergyRegularizedLoss()(logits, targets).item() == pytest.approx(energy(logits, targets).item())
