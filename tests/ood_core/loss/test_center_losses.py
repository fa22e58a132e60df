"""Hand-computed values of the distance/center-based losses (Deep SVDD, CAC, Center, MCHAD, II)."""

from __future__ import annotations

import math

import torch

from ood_core import loss as L


def test_deep_svdd_hand_computed_with_radius() -> None:
    loss = L.DeepSVDDLoss(2, reduction="none", radius=1.0, center=torch.tensor([1.0, 1.0]))
    x = torch.tensor([[1.0, 3.0], [1.5, 1.0], [9.0, 9.0]])
    y = torch.tensor([0, 0, -1])
    # |x - mu|^2 - r^2 = 4 - 1 = 3, 0.25 - 1 < 0 -> 0, OOD -> 0
    torch.testing.assert_close(loss(x, y), torch.tensor([3.0, 0.0, 0.0]))
    torch.testing.assert_close(loss.distance(x), torch.tensor([3.0, -0.75, 127.0]))
    torch.testing.assert_close(loss(x[:2]), torch.tensor([3.0, 0.0]))  # no labels: all ID


def test_deep_svdd_center_is_fixed_and_saved() -> None:
    loss = L.DeepSVDDLoss(3, center=torch.tensor([1.0, 2.0, 3.0]))
    assert list(loss.parameters()) == []
    state = loss.state_dict()
    restored = L.DeepSVDDLoss(3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.center.params, torch.tensor([[1.0, 2.0, 3.0]]))


def test_cac_hand_computed() -> None:
    loss = L.CACLoss(2, magnitude=2.0, alpha=0.5)
    torch.testing.assert_close(loss.centers.params, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    d = loss.distance(x)  # Euclidean: [0, 2*sqrt2], [2, 2]
    torch.testing.assert_close(d, torch.tensor([[0.0, 2 * math.sqrt(2)], [2.0, 2.0]]), atol=1e-5, rtol=0)
    y = torch.tensor([0, 1])
    # sample 1: log(1 + e^{0 - 2 sqrt2}) + 0.5 * 0; sample 2: log(1 + e^0) + 0.5 * 2
    expected = (math.log(1 + math.exp(-2 * math.sqrt(2))) + math.log(2.0) + 1.0) / 2
    torch.testing.assert_close(loss(d, y), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_cac_score_is_min_gamma() -> None:
    d = torch.tensor([[1.0, 3.0]])
    softmin = torch.softmax(-d, dim=1)  # [e^-1, e^-3] / sum
    gamma = d * (1 - softmin)
    torch.testing.assert_close(L.CACLoss.score(d), gamma.min(dim=1).values)
    near, far = torch.tensor([[0.1, 3.0, 3.0]]), torch.tensor([[3.0, 3.0, 3.0]])
    assert L.CACLoss.score(near) < L.CACLoss.score(far)


def test_center_loss_hand_computed() -> None:
    loss = L.CenterLoss(2, 2, magnitude=3.0, radius=1.0)
    torch.testing.assert_close(loss.centers.params.detach(), 3.0 * torch.eye(2))
    z = torch.tensor([[3.0, 2.0], [0.0, 3.5], [0.0, 0.0]])
    d = loss.distance(z)  # squared: [4, 10], [21.25, 0.25], [9, 9]
    torch.testing.assert_close(d, torch.tensor([[4.0, 10.0], [21.25, 0.25], [9.0, 9.0]]))
    # ID rows: max(4 - 1, 0) = 3, max(0.25 - 1, 0) = 0 -> mean 1.5; OOD row ignored
    torch.testing.assert_close(loss(d, torch.tensor([0, 1, -1])), torch.tensor(1.5))


def test_center_loss_trains_centers_unless_fixed() -> None:
    assert len(list(L.CenterLoss(3, 5).parameters())) == 1
    assert list(L.CenterLoss(3, 5, fixed=True).parameters()) == []


def test_mchad_hand_computed() -> None:
    loss = L.MCHADLoss(2, 2, radius=1.0, margin=1.0, weight_center=1.0, weight_nll=2.0, weight_oe=0.5)
    distmat = torch.tensor([[2.0, 5.0], [1.0, 3.0]])  # squared distances
    y = torch.tensor([0, -1])
    center = 2.0 - 1.0  # max(0, D_y - r^2)
    nll = math.log(1 + math.exp(2.0 - 5.0))
    oe = (4.0 - 1.0) + (4.0 - 3.0)  # sum_i max(0, (r + m)^2 - D_i)
    torch.testing.assert_close(loss(distmat, y), torch.tensor(center + 2.0 * nll + 0.5 * oe))


def test_mchad_ood_term_pushes_outliers_away() -> None:
    loss = L.MCHADLoss(2, 2, radius=1.0, margin=1.0)
    y = torch.tensor([-1])
    assert loss(torch.tensor([[0.5, 0.5]]), y) > loss(torch.tensor([[5.0, 5.0]]), y) == 0  # (r + m)^2 = 4


def test_ii_loss_hand_computed_and_running_centers() -> None:
    loss = L.IILoss(n_classes=3, n_embedding=2, alpha=0.5)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [7.0, 7.0]])
    y = torch.tensor([0, 0, 1, -1])
    # batch means: mu0 = (1, 0), mu1 = (0, 4); spread = (1 + 1 + 0) / 3; separation = 1 + 16
    torch.testing.assert_close(loss(x, y), torch.tensor(2 / 3 - 0.5 * 17))
    torch.testing.assert_close(loss.centers.centers[:2], torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    # running centers are exact means over all seen samples of a class
    loss(torch.tensor([[4.0, 0.0], [0.0, 8.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(loss.centers.centers[:2], torch.tensor([[2.0, 0.0], [0.0, 6.0]]))
    loss.eval()
    before = loss.centers.centers.clone()
    loss(x, y)
    torch.testing.assert_close(loss.centers.centers, before)  # eval mode does not update
    probs = loss.predict(torch.tensor([[2.0, 0.1]]))
    assert probs.argmax().item() == 0 and torch.allclose(probs.sum(), torch.tensor(1.0))
