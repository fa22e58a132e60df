"""Hand-computed values of the VOS losses and the virtual-outlier synthesis."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ood_core import loss as L

LN2 = math.log(2.0)


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_vos_reg_loss_hand_computed_one_output_phi() -> None:
    phi = _linear([[1.0]], [0.0])  # phi(E) = E
    weights = _linear([[2.0, -1.0]], [0.0])  # ReLU(w) = [2, 0]
    loss = L.VOSRegLoss(phi, weights, alpha=0.5, reduction="none")
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 5.0]])  # E = -log(2 * e^0) = -log 2 for both
    y = torch.tensor([1, -1])
    id_ce = -math.log(3 / 4)
    id_reg = math.log(1 + math.exp(-LN2))  # -log(1 - sigmoid(E)) = softplus(E)
    ood_reg = math.log(1 + math.exp(LN2))  # -log(sigmoid(E)) = softplus(-E)
    expected = torch.tensor([id_ce + 0.5 * id_reg, 0.5 * ood_reg])
    torch.testing.assert_close(loss(logits, y), expected)


def test_vos_reg_loss_two_output_phi_uses_id_as_class_one() -> None:
    phi = _linear([[1.0], [-1.0]], [0.0, 0.0])  # outputs [E, -E]
    weights = _linear([[1.0, 1.0]], [0.0])
    loss = L.VOSRegLoss(phi, weights, alpha=1.0, reduction="none")
    logits = torch.zeros(1, 2)  # E = -log 2
    energy = -LN2
    expected_reg = F.softplus(torch.tensor(2 * energy))  # -log softmax([E, -E])[1]
    torch.testing.assert_close(loss(logits, torch.tensor([-1])), F.softplus(torch.tensor(-2 * energy)).reshape(1))
    torch.testing.assert_close(loss(logits, torch.tensor([0])), (LN2 + expected_reg).reshape(1))


def test_vos_regularizer_trains_phi_and_energy_weights() -> None:
    torch.manual_seed(0)
    phi, weights = nn.Linear(1, 2), nn.Linear(3, 1)
    nn.init.uniform_(weights.weight, 0.1, 1.0)  # the energy uses relu(weights): keep them in its active region
    loss = L.VOSRegLoss(phi, weights)
    assert {id(p) for p in loss.parameters()} == {id(p) for p in (*phi.parameters(), *weights.parameters())}
    loss(torch.randn(4, 3), torch.tensor([0, 1, -1, -1])).backward()
    assert phi.weight.grad is not None and phi.weight.grad.abs().sum() > 0
    assert weights.weight.grad is not None and weights.weight.grad.abs().sum() > 0


def _synth(sample_number: int = 3, sample_from: int = 1000) -> tuple[L.VirtualOutlierSynthesizingRegLoss, nn.Linear]:
    fc = nn.Linear(2, 2)
    loss = L.VirtualOutlierSynthesizingRegLoss(
        nn.Linear(1, 2),
        nn.Linear(2, 1),
        "cpu",
        2,
        2,
        fc,
        alpha=0.1,
        sample_number=sample_number,
        sample_from=sample_from,
    )
    return loss, fc


def test_synthesizer_is_plain_cross_entropy_until_queues_are_full_then_regularizes() -> None:
    torch.manual_seed(0)
    loss, fc = _synth()
    assert all(p is not fc.weight for p in loss.parameters())  # fc is not a submodule
    features = torch.randn(4, 2)
    y = torch.tensor([0, 0, 1, -1])
    logits = fc(features)
    torch.testing.assert_close(loss(logits, features, y), L.CrossEntropyLoss()(logits, y))
    assert loss.queue_counts.tolist() == [2, 1]
    features = torch.randn(6, 2)
    y = torch.tensor([0, 1, 1, 1, 1, -1])
    logits = fc(features)
    value = loss(logits, features, y)
    assert loss.queue_counts.tolist() == [3, 3]
    torch.testing.assert_close(loss.queue[1], features[2:5])  # FIFO keeps the newest 3 of class 1
    assert value > L.CrossEntropyLoss()(logits, y)
    value.backward()
    assert fc.weight.grad is not None and loss.logistic_regression.weight.grad is not None


def test_synthesized_outliers_lie_in_the_low_density_region() -> None:
    torch.manual_seed(1)
    loss, _ = _synth(sample_number=200)
    with torch.no_grad():
        loss.queue.copy_(torch.randn(2, 200, 2) + torch.tensor([[[10.0, 0.0]], [[-10.0, 0.0]]]))
        loss.queue_counts.fill_(200)
    outliers = loss.synthesize()
    assert outliers.shape == (2, 2)
    # the best of 1000 draws by Mahalanobis norm is beyond 2.5 (P(all 1000 within) ~ 1e-19)
    distances = (outliers - torch.tensor([[10.0, 0.0], [-10.0, 0.0]])).norm(dim=1)
    assert (distances > 2.5).all() and (distances < 8).all()


def test_synthesizer_regularizer_on_hand_computed_case(monkeypatch) -> None:
    # identity last layer, unit energy weights (E = -logsumexp), phi(E) = E with one output
    fc = _linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    loss = L.VirtualOutlierSynthesizingRegLoss(
        _linear([[1.0]], [0.0]),
        _linear([[1.0, 1.0]], [0.0]),
        "cpu",
        2,
        2,
        fc,
        alpha=0.5,
        reduction="none",
        sample_number=1,
        sample_from=10,
    )
    virtual = torch.tensor([[-LN2, -LN2], [0.0, 0.0]])  # energies 0 and -log 2
    monkeypatch.setattr(loss, "synthesize", lambda: virtual)
    features = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # energies -log 2 and -log 4
    y = torch.tensor([0, 1])  # one sample per class fills both queues (sample_number = 1)
    nll = torch.tensor([LN2, -math.log(3 / 4)])
    # ID: -log(1 - sigmoid(E)) = softplus(E); virtual outliers: -log sigmoid(E) = softplus(-E); mean of all four
    regularizer = (math.log(1.5) + math.log(1.25) + LN2 + math.log(3.0)) / 4
    torch.testing.assert_close(loss(fc(features), features, y), nll + 0.5 * regularizer)
