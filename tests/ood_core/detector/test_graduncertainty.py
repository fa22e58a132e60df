from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ood_core.detector import GradUncertainty
from ood_core.state import load_detector, save_detector

from .synthetic import block_head, separable_features


def linear() -> nn.Linear:
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    return layer


def closed_form(model: nn.Linear, h: Tensor, bias: bool) -> Tensor:
    """L = -sum_c log p_c: dL/dz = C p - 1; ||dL/dW||^2 = ||dL/dz||^2 ||h||^2, ||dL/db||^2 = ||dL/dz||^2."""
    with torch.no_grad():
        p = model(h).softmax(dim=1)
    dz2 = ((p.shape[1] * p - 1) ** 2).sum(1)
    return -(dz2 * (h**2).sum(1) + (dz2 if bias else 0.0))


def test_score_on_a_linear_model_is_the_closed_form() -> None:
    model, h = linear(), torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 4.0]])
    torch.testing.assert_close(GradUncertainty(model).predict(h), closed_form(model, h, bias=True))
    torch.testing.assert_close(GradUncertainty(model, "weight").predict(h), closed_form(model, h, bias=False))
    # a uniform prediction has a zero gradient: the largest possible score
    flat = nn.Linear(2, 3)
    nn.init.zeros_(flat.weight), nn.init.zeros_(flat.bias)
    torch.testing.assert_close(GradUncertainty(flat).predict(h), torch.zeros(3))


def test_equals_the_binary_cross_entropy_of_the_paper_where_it_does_not_clamp() -> None:
    model, h = linear(), torch.tensor([[0.3, -0.2], [1.0, 0.4]])
    expected = []
    for row in h:
        weights = [p for p in model.parameters()]
        loss = nn.functional.binary_cross_entropy(model(row[None]).softmax(1), torch.ones(1, 3), reduction="sum")
        grads = torch.autograd.grad(loss, weights)
        expected.append(-torch.stack([(g**2).sum() for g in grads]).sum())
    torch.testing.assert_close(GradUncertainty(model).predict(h), torch.stack(expected).detach())


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, _, ood_z = separable_features()
    det = GradUncertainty(block_head(), ["weight"])
    assert det.predict(id_z).max() < det.predict(ood_z).min()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    det = GradUncertainty(linear(), ["bias"])
    assert det.fit_passes == 0 and det.hparams() == {"param_filter": ["bias"]}
    save_detector(det, tmp_path / "g.safetensors")
    loaded = load_detector(tmp_path / "g.safetensors", model=linear())
    h = torch.randn(5, 2)
    torch.testing.assert_close(loaded.predict(h), det.predict(h), rtol=0, atol=0)
    with pytest.raises(ValueError, match="selects none"):
        load_detector(tmp_path / "g.safetensors", model=nn.Sequential(nn.Linear(2, 3, bias=False)))
