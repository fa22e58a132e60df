from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ood_core.api import FeaturesNotSupportedError
from ood_core.detector import GradNorm
from ood_core.state import load_detector, save_detector

from .synthetic import block_head, separable_features


def linear() -> nn.Linear:
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.0, 0.0]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    return layer


def closed_form(model: nn.Linear, h: Tensor, temperature: float, bias: bool) -> Tensor:
    """dL/dz = (softmax(z / T) - 1/C) / T; dL/dW = outer(dL/dz, h), dL/db = dL/dz."""
    with torch.no_grad():
        p = (model(h) / temperature).softmax(dim=1)
    dz = (p - 1.0 / p.shape[1]).abs().sum(1) / temperature
    return -(dz * h.abs().sum(1) + (dz if bias else 0.0))


def test_score_on_a_linear_model_is_the_closed_form() -> None:
    model, h = linear(), torch.tensor([[1.0, 2.0, -0.5], [0.0, 0.0, 3.0], [-1.0, 1.0, 1.0]])
    torch.testing.assert_close(GradNorm(model).predict(h), closed_form(model, h, 1.0, bias=True))
    torch.testing.assert_close(
        GradNorm(model, ["weight"], temperature=2.0).predict(h), closed_form(model, h, 2.0, False)
    )
    by_callable = GradNorm(model, lambda name: name == "weight", micro_batch_size=1, temperature=2.0)
    torch.testing.assert_close(by_callable.predict(h), closed_form(model, h, 2.0, False))


def test_micro_batches_and_grad_modes_do_not_change_the_scores_or_the_model() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    model[0].requires_grad_(False)  # frozen parameters are scored too
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in model.parameters()]
    reference = GradNorm(model).predict(x)
    torch.testing.assert_close(GradNorm(model, micro_batch_size=2).predict(x), reference)
    torch.testing.assert_close(torch.cat([GradNorm(model).predict(row[None]) for row in x]), reference)
    with torch.no_grad():
        torch.testing.assert_close(GradNorm(model).predict(x), reference)
    with torch.inference_mode():
        torch.testing.assert_close(GradNorm(model).predict(x.clone()), reference)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_module_names_select_their_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    by_name = GradNorm(model, ["2"]).predict(x)
    by_callable = GradNorm(model, lambda n: n.startswith("2.")).predict(x)
    torch.testing.assert_close(by_name, by_callable)
    assert not torch.allclose(by_name, GradNorm(model).predict(x))
    with pytest.raises(ValueError, match="selects none"):
        GradNorm(model, ["fc"])


def test_ood_scores_higher_on_separable_features() -> None:
    id_z, _, ood_z = separable_features()
    det = GradNorm(block_head(), ["weight"])
    assert det.predict(id_z).max() < det.predict(ood_z).min()


def test_needs_the_network_and_no_fit() -> None:
    det = GradNorm(linear(), ["weight"], micro_batch_size=4, temperature=3.0)
    assert det.fit_passes == 0 and det.is_fitted
    with pytest.raises(FeaturesNotSupportedError):
        det.predict_features(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="micro_batch_size"):
        GradNorm(linear(), micro_batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        GradNorm(linear(), temperature=0.0)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    det = GradNorm(linear(), ["weight"], micro_batch_size=4, temperature=3.0)
    save_detector(det, tmp_path / "g.safetensors")
    loaded = load_detector(tmp_path / "g.safetensors", model=linear())
    assert type(loaded) is GradNorm and loaded.hparams() == det.hparams()
    x = torch.randn(6, 3)
    torch.testing.assert_close(loaded.predict(x), det.predict(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="JSON"):
        save_detector(GradNorm(linear(), lambda name: True))
