"""OODMetrics against scikit-learn on the raw data (OOD = label < 0 is the positive class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import Tensor

from ood_core.metrics import OODMetrics, fpr_at_tpr, ood_metrics


def sklearn_metrics(scores: Tensor, y: Tensor, level: float = 0.95) -> dict[str, float]:
    s = scores.reshape(-1).double().numpy()
    ood = (y.reshape(-1) < 0).numpy().astype(int)
    fpr, tpr, _ = roc_curve(ood, s, drop_intermediate=False)
    return {
        "AUROC": roc_auc_score(ood, s),
        "AUPR-IN": average_precision_score(1 - ood, -s),
        "AUPR-OUT": average_precision_score(ood, s),
        f"FPR{round(level * 100)}TPR": float(fpr[np.argmax(tpr >= level)]),
    }


def assert_metrics_close(actual: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def random_data(n: int, seed: int, tied: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(-2, 4, (n,), generator=g)  # about a third OOD, several OOD label values
    scores = torch.randn(n, generator=g) + 0.8 * (y < 0)
    if tied:
        scores = (scores * 1.5).round()  # a handful of distinct values, each shared by ID and OOD
    return scores, y


def test_hand_computed_case() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 3.0])
    y = torch.tensor([0, 1, -1, -1])
    result = ood_metrics(scores, y)
    # OOD > ID pairs: (2>1), (2=2 counts 1/2), (3>1), (3>2) -> 3.5 / 4
    assert result["AUROC"] == pytest.approx(0.875)
    # thresholds 3 (TPR 1/2, FPR 0) then 2 (TPR 1, FPR 1/2): first TPR >= 95% flags half the ID samples
    assert result["FPR95TPR"] == pytest.approx(0.5)
    # OOD positive: at 3 precision 1 (recall 1/2), at 2 precision 2/3 (recall 1)
    assert result["AUPR-OUT"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_constant_scores_are_one_threshold() -> None:
    result = ood_metrics(torch.full((10,), 3.0), torch.tensor([0] * 6 + [-1] * 4))
    assert result["AUROC"] == pytest.approx(0.5)  # every OOD-ID pair is a tie
    assert result["FPR95TPR"] == pytest.approx(1.0)  # the only threshold flags everything
    assert result["AUPR-OUT"] == pytest.approx(0.4)  # precision = OOD share
    assert result["AUPR-IN"] == pytest.approx(0.6)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(tied: bool, seed: int) -> None:
    scores, y = random_data(997, seed, tied)
    assert_metrics_close(ood_metrics(scores, y), sklearn_metrics(scores, y))


@pytest.mark.parametrize("level", [0.8, 0.9, 0.99])
def test_fpr_at_other_tpr_levels(level: float) -> None:
    scores, y = random_data(500, 3, tied=True)
    key = f"FPR{round(level * 100)}TPR"
    result = OODMetrics(fpr_at=level).update(scores, y).compute()
    assert result[key] == pytest.approx(sklearn_metrics(scores, y, level)[key])
    assert fpr_at_tpr(scores, (y < 0).long(), level) == pytest.approx(result[key])


def test_many_updates_equal_one() -> None:
    scores, y = random_data(1000, 4, tied=True)
    streamed = OODMetrics()
    for chunk_scores, chunk_y in zip(scores.split(37), y.split(37), strict=True):
        streamed.update(chunk_scores, chunk_y)
    assert streamed.compute() == OODMetrics().update(scores, y).compute()


def test_memory_is_bounded_by_distinct_scores() -> None:
    metrics = OODMetrics()
    g = torch.Generator().manual_seed(5)
    seen: set[float] = set()
    for _ in range(50):
        scores = torch.randint(0, 20, (64,), generator=g).float() / 4
        metrics.update(scores, torch.randint(-1, 2, (64,), generator=g))
        seen.update(scores.tolist())
    assert metrics.num_distinct_scores == len(seen) <= 20


def test_void_label_zero_is_dropped() -> None:
    scores, y = random_data(600, 6, tied=False)
    # label 0 = void (e.g. "unlabelled" pixels); as OOD-looking scores they would change every metric
    scores[y == 0] = 100.0
    result = OODMetrics(void_label=0).update(scores, y).compute()
    keep = y != 0
    assert_metrics_close(result, sklearn_metrics(scores[keep], y[keep]))
    assert result["AUROC"] != pytest.approx(OODMetrics().update(scores, y).compute()["AUROC"])


def test_segmentation_pools_pixels() -> None:
    scores, y = random_data(4 * 16 * 16, 7, tied=True)
    scores, y = scores.view(4, 16, 16), y.view(4, 16, 16)
    metrics = OODMetrics(mode="segmentation", void_label=255)
    y[0, :2] = 255
    metrics.update(scores[:2], y[:2]).update(scores[2:], y[2:])
    keep = y != 255
    assert_metrics_close(metrics.compute(), sklearn_metrics(scores[keep], y[keep]))


def test_segmentation_per_image_averages_images_with_both_classes() -> None:
    scores, y = random_data(5 * 8 * 8, 8, tied=False)
    scores, y = scores.view(5, 8, 8), y.view(5, 8, 8)
    y[1] = y[1].abs()  # image 1 has no OOD pixel: skipped
    y[3] = -1  # image 3 has only OOD pixels: skipped
    metrics = OODMetrics(mode="segmentation-per-image")
    metrics.update(scores[:3], y[:3]).update(scores[3:], y[3:])
    per_image = [sklearn_metrics(scores[i], y[i]) for i in (0, 2, 4)]
    expected = {key: float(np.mean([m[key] for m in per_image])) for key in per_image[0]}
    result = metrics.compute()
    assert_metrics_close(result, expected)
    assert result["images"] == 3


def test_segmentation_modes_drop_void_label_zero_first() -> None:
    scores, y = random_data(3 * 8 * 8, 10, tied=True)
    scores, y = scores.view(3, 8, 8), y.view(3, 8, 8)
    y[1][y[1] < 0] = 0  # image 1: its OOD pixels become void, so it has only ID pixels left
    scores[y == 0] = 50.0  # void pixels would dominate every metric if they were counted
    keep = y != 0
    pooled = OODMetrics(mode="segmentation", void_label=0).update(scores, y).compute()
    assert_metrics_close(pooled, sklearn_metrics(scores[keep], y[keep]))
    per_image = OODMetrics(mode="segmentation-per-image", void_label=0).update(scores, y).compute()
    expected = [sklearn_metrics(scores[i][keep[i]], y[i][keep[i]]) for i in (0, 2)]
    assert_metrics_close(per_image, {key: float(np.mean([m[key] for m in expected])) for key in expected[0]})
    assert per_image["images"] == 2


def test_one_class_only_raises() -> None:
    with pytest.raises(ValueError, match="ID and OOD"):
        ood_metrics(torch.rand(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="ID and OOD"):
        ood_metrics(torch.rand(10), -torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="ID and OOD"):
        OODMetrics().compute()
    per_image = OODMetrics(mode="segmentation-per-image").update(torch.rand(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="both ID and OOD"):
        per_image.compute()


def test_reset_forgets_data() -> None:
    metrics = OODMetrics().update(torch.tensor([0.0, 1.0]), torch.tensor([0, -1]))
    metrics.reset()
    assert metrics.num_distinct_scores == 0
    with pytest.raises(ValueError):
        metrics.compute()


def test_predictions_give_id_accuracy() -> None:
    y = torch.tensor([0, 1, 2, -1, 3])
    predictions = torch.tensor([0, 1, 0, 2, 0])  # 2 of the 4 ID samples right; OOD ignored
    result = OODMetrics().update(torch.rand(5), y, predictions).compute()
    assert result["ACC"] == pytest.approx(0.5)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        OODMetrics().update(torch.rand(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        OODMetrics().update(torch.tensor([0.0, float("nan")]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="mode"):
        OODMetrics(mode="detection")
    with pytest.raises(ValueError, match="fpr_at"):
        OODMetrics(fpr_at=0.0)


def test_utils_reexports_metrics() -> None:
    from ood_core.utils import OODMetrics as FromUtils

    assert FromUtils is OODMetrics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_match_cpu() -> None:
    scores, y = random_data(500, 9, tied=True)
    on_gpu = OODMetrics().update(scores.cuda(), y.cuda()).compute()
    assert_metrics_close(on_gpu, OODMetrics().update(scores, y).compute())
