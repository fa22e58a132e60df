"""The per-metric classes: streamed batches give the functional (scikit-learn-checked) values; void labels, reset,
devices, AUTC's undefined cases; the seed's metrics example runs unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from ood_core.metrics import AUPR, AUROC, AUTC, Accuracy, FPRAtTPR, Metric
from ood_core.metrics import functional as F


def random_data(n: int, seed: int, tied: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(-2, 4, (n,), generator=g)
    scores = torch.randn(n, generator=g) + 0.8 * (y < 0)
    return ((scores * 1.5).round() if tied else scores), y


def streamed(metric: Metric, *inputs: Tensor, chunk: int = 37) -> dict[str, float]:
    for parts in zip(*(t.split(chunk) for t in inputs), strict=True):
        metric.update(*parts)
    return metric.compute()


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_batches_equal_the_functional_metrics(tied: bool) -> None:
    scores, y = random_data(1000, 1, tied)
    assert streamed(AUROC(), scores, y)["AUROC"] == pytest.approx(roc_auc_score((y < 0).numpy(), scores.numpy()))
    assert streamed(AUPR(), scores, y) == {"AUPR-OUT": pytest.approx(float(F.aupr(scores, y)))}
    assert streamed(AUPR("id"), scores, y) == {"AUPR-IN": pytest.approx(float(F.aupr(scores, y, "id")))}
    assert streamed(FPRAtTPR(), scores, y) == {"FPR95TPR": pytest.approx(float(F.fpr_at_tpr(scores, y)))}
    assert streamed(FPRAtTPR(0.9), scores, y) == {"FPR90TPR": pytest.approx(float(F.fpr_at_tpr(scores, y, 0.9)))}
    assert streamed(AUTC(), scores, y)["AUTC"] == pytest.approx(float(F.autc(scores, y)), rel=1e-12)


def test_accuracy_counts_id_samples_only() -> None:
    y = torch.tensor([0, 1, 2, -1, 3, -1])
    predictions = torch.tensor([0, 1, 0, 2, 0, 0])
    assert streamed(Accuracy(), predictions, y, chunk=4) == {"ACC": 0.5}
    with pytest.raises(ValueError, match="ID samples"):
        Accuracy().update(torch.zeros(2), -torch.ones(2)).compute()


def test_keywords_void_label_and_reset() -> None:
    scores, y = random_data(400, 2, tied=False)
    y[:50] = 255
    scores[:50] = 100.0  # would change every metric if counted
    metric = AUROC(void_label=255).update(scores=scores, labels=y)
    keep = y != 255
    assert metric.compute()["AUROC"] == pytest.approx(roc_auc_score((y[keep] < 0).numpy(), scores[keep].numpy()))
    assert metric.reset() is metric
    with pytest.raises(ValueError, match="ID and OOD"):
        metric.compute()
    with pytest.raises(ValueError, match="ID and OOD"):
        AUTC().compute()


def test_autc_is_nan_with_a_warning_when_undefined() -> None:
    labels = torch.tensor([0, 0, -1, -1])
    with pytest.warns(UserWarning, match="AUTC"):
        assert math.isnan(AUTC().update(torch.ones(4), labels).compute()["AUTC"])
    with pytest.warns(UserWarning, match="AUTC"):
        assert math.isnan(AUTC().update(torch.tensor([0.0, 1.0, 2.0, math.inf]), labels).compute()["AUTC"])


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        AUROC().update(torch.rand(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        AUTC().update(torch.tensor([0.0, math.nan]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="positive"):
        AUPR("all")
    with pytest.raises(ValueError, match="tpr"):
        FPRAtTPR(95)


def test_segmentation_maps_are_pooled_pixels() -> None:
    scores, y = random_data(2 * 8 * 8, 3, tied=True)
    metric = (
        AUROC()
        .update(scores.view(2, 8, 8)[:1], y.view(2, 8, 8)[:1])
        .update(scores.view(2, 8, 8)[1:], y.view(2, 8, 8)[1:])
    )
    assert metric.compute()["AUROC"] == pytest.approx(float(F.auroc(scores, y)))


def test_seed_metrics_example_runs_unchanged() -> None:
    """The overview's (001) example: ``OODMetrics`` from ``utils``, ``update(detector(x), y)``, ``compute()``."""
    from ood_core.detector import EnergyBased
    from ood_core.utils import OODMetrics

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x_id, x_ood = 6 * torch.randn(64, 4), 0.1 * torch.randn(64, 4)  # OOD: small logits, high energy
    data_loader = [(x_id[i : i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)]
    data_loader += [(x_ood[i : i + 16], -torch.ones(16, dtype=torch.long)) for i in range(0, 64, 16)]
    detector = EnergyBased(model)
    metrics = OODMetrics()
    for x, y in data_loader:
        metrics.update(detector(x), y)
    result = metrics.compute()
    assert set(result) == {"AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"}
    assert result["AUROC"] > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_match_cpu() -> None:
    scores, y = random_data(500, 9, tied=True)
    for make in (AUROC, AUPR, FPRAtTPR, AUTC):
        assert make().update(scores.cuda(), y.cuda()).compute() == pytest.approx(make().update(scores, y).compute())
