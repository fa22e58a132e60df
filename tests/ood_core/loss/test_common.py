"""Properties every loss must have: gradients reach the inputs, reductions give the right shapes, OOD
samples are ignored by unsupervised losses, segmentation inputs work where supported."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from ood_core import loss as L

B, C, D, H, W = 6, 3, 4, 2, 3


# name -> (factory, call(loss, x, y), is_unsupervised); x is used as logits, features or distances
Call = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _logits_call(loss: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss(x, y)


def _objectosphere_call(loss: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss(x, 2 * x, y)


def _confidence_call(loss: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss(x, torch.sigmoid(x[:, :1]), y)


def _distance_call(loss: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss(x.pow(2), y)


REDUCIBLE: dict[str, tuple[Callable[[str], nn.Module], Call, bool]] = {
    "CrossEntropyLoss": (lambda r: L.CrossEntropyLoss(reduction=r), _logits_call, True),
    "LogitNorm": (lambda r: L.LogitNorm(reduction=r), _logits_call, True),
    "DeepSVDDLoss": (lambda r: L.DeepSVDDLoss(C, reduction=r), _logits_call, True),
    "DeepSADLoss": (lambda r: L.DeepSADLoss(C, reduction=r), _logits_call, False),
    "OutlierExposureLoss": (lambda r: L.OutlierExposureLoss(reduction=r), _logits_call, False),
    "EntropicOpenSetLoss": (lambda r: L.EntropicOpenSetLoss(reduction=r), _logits_call, False),
    "ObjectosphereLoss": (lambda r: L.ObjectosphereLoss(reduction=r), _objectosphere_call, False),
    "EnergyRegularizedLoss": (lambda r: L.EnergyRegularizedLoss(reduction=r), _logits_call, False),
    "VOSRegLoss": (lambda r: L.VOSRegLoss(nn.Linear(1, 2), nn.Linear(C, 1), reduction=r), _logits_call, False),
    "BackgroundClassLoss": (lambda r: L.BackgroundClassLoss(C - 1, reduction=r), _logits_call, False),
}

SCALAR: dict[str, tuple[Callable[[], nn.Module], Call, bool]] = {
    "CACLoss": (lambda: L.CACLoss(C), _distance_call, True),
    "CenterLoss": (lambda: L.CenterLoss(C, C), _distance_call, True),
    "IILoss": (lambda: L.IILoss(C, C), _logits_call, True),
    "ConfidenceLoss": (lambda: L.ConfidenceLoss(), _confidence_call, True),
    "MCHADLoss": (lambda: L.MCHADLoss(C, C, radius=1.0, margin=1.0), _distance_call, False),
}

SEGMENTATION = [
    "CrossEntropyLoss",
    "LogitNorm",
    "DeepSVDDLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "ObjectosphereLoss",
    "EnergyRegularizedLoss",
    "VOSRegLoss",
    "BackgroundClassLoss",
    "DeepSADLoss",
]

#: losses whose ``mean`` averages the ID and the OOD terms each over their own samples
SEPARATE_MEANS = {"EnergyRegularizedLoss"}


def _batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, -1, -1])  # labels < C - 1 so that BackgroundClassLoss fits too
    return x, y


def test_all_names_exported() -> None:
    assert set(REDUCIBLE) | set(SCALAR) | {"VirtualOutlierSynthesizingRegLoss", "EnergyMarginLoss"} <= set(L.__all__)


@pytest.mark.parametrize("name", sorted(REDUCIBLE))
def test_reduction_shapes_and_consistency(name: str) -> None:
    factory, call, unsupervised = REDUCIBLE[name]
    torch.manual_seed(0)
    x, y = _batch()
    losses = {}
    for reduction in ("none", "mean", "sum"):
        torch.manual_seed(1)  # same parameters for every reduction
        losses[reduction] = call(factory(reduction), x, y)
    assert losses["none"].shape == y.shape
    assert losses["mean"].shape == losses["sum"].shape == ()
    torch.testing.assert_close(losses["sum"], losses["none"].sum())
    if name in SEPARATE_MEANS:
        known = y >= 0
        expected = losses["none"][known].mean() + losses["none"][~known].mean()
    else:
        expected = losses["none"].sum() / (int((y >= 0).sum()) if unsupervised else y.numel())
    torch.testing.assert_close(losses["mean"], expected)
    with pytest.raises(ValueError):
        factory("average")


@pytest.mark.parametrize("name", sorted(REDUCIBLE) + sorted(SCALAR))
def test_gradients_reach_inputs(name: str) -> None:
    factory, call, _ = REDUCIBLE[name] if name in REDUCIBLE else SCALAR[name]
    module = factory("mean") if name in REDUCIBLE else factory()  # type: ignore[call-arg]
    x, y = _batch()
    value = call(module, x, y)
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[y >= 0].abs().sum() > 0


@pytest.mark.parametrize("name", [n for n, v in {**REDUCIBLE, **SCALAR}.items() if v[2]])
def test_unsupervised_losses_ignore_ood(name: str) -> None:
    factory, call, _ = REDUCIBLE[name] if name in REDUCIBLE else SCALAR[name]
    torch.manual_seed(3)
    module = factory("mean") if name in REDUCIBLE else factory()  # type: ignore[call-arg]
    module.eval()  # IILoss: use (unchanged) running centers
    x, y = _batch()
    before = call(module, x, y)
    x_changed = x.detach().clone()
    x_changed[y < 0] = 100.0 * torch.randn_like(x_changed[y < 0])
    x_changed.requires_grad_(True)
    after = call(module, x_changed, y)
    torch.testing.assert_close(before, after)
    after.backward()
    assert x_changed.grad is not None and (x_changed.grad[y < 0] == 0).all()
    # dropping the OOD samples changes nothing either
    torch.testing.assert_close(call(module, x.detach()[y >= 0], y[y >= 0]), before.detach())


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_matches_per_pixel_classification(name: str) -> None:
    factory, call, _ = REDUCIBLE[name]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, C, H, W, generator=g)
    y = torch.randint(0, C - 1, (2, H, W), generator=g)
    y[0, 0, :2] = -1
    torch.manual_seed(1)
    dense = call(factory("none"), x, y)
    assert dense.shape == (2, H, W)
    torch.manual_seed(1)
    flat = call(factory("none"), x.movedim(1, -1).reshape(-1, C), y.reshape(-1))
    torch.testing.assert_close(dense.reshape(-1), flat)


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError):
        L.CrossEntropyLoss()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, dtype=torch.long))
