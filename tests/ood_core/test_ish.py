"""ISH: forward unchanged, weight gradient from the shaped input (hand-computed), other gradients ordinary."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ood_core.ish import ISHLinear, ish, kept_count


def _layer() -> nn.Linear:
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 2.0], [0.0, 3.0, -2.0, 1.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return layer


def test_weight_gradient_hand_computed() -> None:
    layer = ish(_layer(), p=0.5)  # keep 2 of 4 activations per sample
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-5.0, 1.0, 0.0, 2.0]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # dL/dy
    out = layer(x)
    (out * upstream).sum().backward()

    # sample 1: keep 3, 4; s1 = 10, s2 = 7. sample 2: keep -5, 2 (by magnitude); s1 = 8, s2 = 7 (magnitudes)
    shaped1 = [0.0, 0.0, 3.0 * math.exp(10 / 7), 4.0 * math.exp(10 / 7)]
    shaped2 = [-5.0 * math.exp(8 / 7), 0.0, 0.0, 2.0 * math.exp(8 / 7)]
    expected_weight_grad = torch.tensor(
        [
            [1 * a + 3 * b for a, b in zip(shaped1, shaped2, strict=True)],
            [2 * a - 1 * b for a, b in zip(shaped1, shaped2, strict=True)],
        ]
    )
    assert layer.weight.grad is not None and layer.bias.grad is not None and x.grad is not None
    torch.testing.assert_close(layer.weight.grad, expected_weight_grad)
    # ordinary bias and input gradients
    torch.testing.assert_close(layer.bias.grad, torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(x.grad, upstream @ layer.weight.detach())


def test_forward_is_unchanged_and_parameters_are_shared() -> None:
    plain = _layer()
    wrapped = ISHLinear(plain, p=0.85)
    assert isinstance(wrapped, nn.Linear)
    assert wrapped.weight is plain.weight and wrapped.bias is plain.bias
    assert set(wrapped.state_dict()) == {"weight", "bias"}
    x = torch.randn(5, 4)
    torch.testing.assert_close(wrapped(x), F.linear(x, plain.weight, plain.bias))
    assert wrapped.to_linear().weight is plain.weight


def test_eval_mode_gives_ordinary_gradients() -> None:
    layer = ish(_layer(), p=0.5).eval()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(2, 1) * x)


def test_all_zero_sample_contributes_nothing() -> None:
    layer = ish(_layer(), p=0.5)
    layer(torch.zeros(1, 4)).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert (layer.weight.grad == 0).all()


def test_kept_count_and_validation() -> None:
    assert kept_count(512, 0.85) == 77
    assert kept_count(10, 0.8) == 2
    assert kept_count(3, 0.99) == 1
    with pytest.raises(ValueError):
        ish(_layer(), p=1.0)


def test_works_with_extra_leading_dimensions() -> None:
    layer = ish(nn.Linear(3, 2), p=0.0)  # p = 0: nothing dropped, scale e^1
    x = torch.randn(2, 5, 3).abs()
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, math.e * x.reshape(-1, 3).sum(0).expand(2, 3))


def test_fine_tuning_example_on_the_digits_model_runs() -> None:
    """examples/ish_finetune.py (the issue's fine-tuning example) keeps working: one epoch with ISH on ``fc``
    updates the wrapped layer and keeps the pretrained model's ID accuracy."""
    import importlib.util
    from pathlib import Path

    from ood_core.zoo import load_classifier

    path = Path(__file__).resolve().parents[2] / "examples" / "ish_finetune.py"
    spec = importlib.util.spec_from_file_location("ish_finetune_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    device = torch.device("cpu")
    model = load_classifier(device=device)
    before = model.fc.weight.detach().clone()
    model.fc = ish(model.fc, p=0.85)
    torch.manual_seed(0)
    example.fine_tune(model, epochs=1, lr=0.01, seed=0, device=device)
    accuracy, near_ood_auroc = example.evaluate(model, device)
    assert isinstance(model.fc, ISHLinear) and not torch.equal(model.fc.weight, before)
    assert accuracy > 0.95 and 0.5 < near_ood_auroc <= 1.0
