"""The functional metrics against scikit-learn on random data (with and without ties) and on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import Tensor

from ood_core.metrics import OODMetrics, aurra, calc_openness, calibration_error, oscr_score
from ood_core.metrics import functional as F


def random_data(n: int, seed: int, tied: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(-2, 4, (n,), generator=g)  # about a third OOD
    scores = torch.randn(n, generator=g) + 0.8 * (y < 0)
    if tied:
        scores = (scores * 1.5).round()
    return scores, y


CASES = [(seed, tied) for seed in (0, 1) for tied in (False, True)]


@pytest.mark.parametrize(("seed", "tied"), CASES)
def test_roc_curve_and_auroc_match_sklearn(seed: int, tied: bool) -> None:
    scores, y = random_data(801, seed, tied)
    ood = (y < 0).numpy()
    fpr, tpr, thresholds = F.roc_curve(scores, y)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(ood, scores.double().numpy(), drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thresholds.numpy(), sk_thr[1:])  # sklearn starts with an inf threshold
    assert float(F.auroc(scores, y)) == pytest.approx(skm.roc_auc_score(ood, scores.numpy()), abs=1e-12)


@pytest.mark.parametrize(("seed", "tied"), CASES)
@pytest.mark.parametrize("positive", ["ood", "id"])
def test_pr_curve_and_aupr_match_sklearn(seed: int, tied: bool, positive: str) -> None:
    scores, y = random_data(801, seed, tied)
    is_pos = ((y < 0) if positive == "ood" else (y >= 0)).numpy()
    signed = scores.double().numpy() * (1 if positive == "ood" else -1)
    precision, recall, thresholds = F.pr_curve(scores, y, positive=positive)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(is_pos, signed)
    np.testing.assert_allclose(precision.numpy(), sk_p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(recall.numpy(), sk_r, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thresholds.numpy() * (1 if positive == "ood" else -1), sk_t)
    expected = skm.average_precision_score(is_pos, signed)
    assert float(F.aupr(scores, y, positive=positive)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("seed", "tied"), CASES)
@pytest.mark.parametrize("level", [0.0, 0.5, 0.95, 1.0])
def test_fpr_at_tpr_matches_sklearn_and_oodmetrics(seed: int, tied: bool, level: float) -> None:
    scores, y = random_data(500, seed, tied)
    sk_fpr, sk_tpr, _ = skm.roc_curve((y < 0).numpy(), scores.double().numpy(), drop_intermediate=False)
    expected = float(sk_fpr[np.argmax(sk_tpr >= level)])
    assert float(F.fpr_at_tpr(scores, y, level)) == pytest.approx(expected)
    if level > 0:
        key = f"FPR{round(level * 100)}TPR"
        assert OODMetrics(fpr_at=level).update(scores, y).compute()[key] == pytest.approx(expected)


def test_curves_on_a_hand_computed_case() -> None:
    scores, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0, 1, -1, -1])
    fpr, tpr, thresholds = F.roc_curve(scores, y)
    torch.testing.assert_close(thresholds, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(tpr, torch.tensor([0.0, 0.5, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(fpr, torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    assert float(F.auroc(scores, y)) == pytest.approx(0.875)  # 3.5 of 4 OOD-ID pairs, the tie counts half
    assert float(F.aupr(scores, y)) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert float(F.fpr_at_tpr(scores, y, 0.95)) == pytest.approx(0.5)
    assert float(F.accuracy(torch.tensor([0, 0, 3, 3]), y)) == pytest.approx(0.5)  # OOD ignored


def test_autc_hand_computed_and_against_the_threshold_integral() -> None:
    scores, y = torch.tensor([0.0, 1.0, 2.0, 4.0]), torch.tensor([0, 0, -1, -1])
    # normalized [0, .25, .5, 1]: area under FPR = mean ID = .125, under FNR = mean(1 - OOD) = .25
    assert float(F.autc(scores, y)) == pytest.approx((0.125 + 0.25) / 2)
    scores, y = random_data(300, 3, tied=True)
    s = (scores - scores.min()) / (scores.max() - scores.min())
    tau = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    fpr = (s[y >= 0].double().unsqueeze(1) > tau).double().mean(0)  # ID flagged above the threshold
    fnr = (s[y < 0].double().unsqueeze(1) <= tau).double().mean(0)  # OOD missed
    assert float(F.autc(scores, y)) == pytest.approx(float(torch.trapezoid(fpr + fnr, tau)) / 2, abs=1e-4)
    perfect = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, -1, -1])
    assert float(F.autc(*perfect)) == 0.0
    with pytest.raises(ValueError, match="constant"):
        F.autc(torch.ones(4), torch.tensor([0, 0, -1, -1]))
    with pytest.raises(ValueError, match="finite"):
        F.autc(torch.tensor([0.0, math.inf]), torch.tensor([0, -1]))


def test_oscr_hand_computed() -> None:
    scores = torch.tensor([0.1, 0.4, 0.5, 0.3, 0.9])
    labels = torch.tensor([0, 1, 2, -1, -1])
    predictions = torch.tensor([0, 0, 2, 5, 5])  # known: right, wrong, right
    # (0,0) -> (0,1/3) -> (1/2,1/3) -> (1/2,2/3) -> (1,2/3): area 1/6 + 1/3
    assert oscr_score(scores, predictions, labels) == pytest.approx(0.5)


@pytest.mark.parametrize("tied", [False, True])
def test_oscr_is_accuracy_times_auroc_of_correct_known_against_unknown(tied: bool) -> None:
    scores, y = random_data(700, 5, tied)
    g = torch.Generator().manual_seed(1)
    predictions = torch.where(torch.rand(700, generator=g) < 0.7, y, (y + 1) % 4)
    known, correct = y >= 0, (predictions == y) & (y >= 0)
    accuracy = int(correct.sum()) / int(known.sum())
    keep = correct | ~known
    auroc = skm.roc_auc_score((y[keep] < 0).numpy(), scores[keep].numpy())
    assert oscr_score(scores, predictions, y) == pytest.approx(accuracy * auroc, abs=1e-12)
    perfect = torch.where(y < 0, 10.0, 0.0)
    assert oscr_score(perfect, predictions, y) == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="known"):
        oscr_score(scores[known], predictions[known], y[known])


def _calibration_reference(conf: np.ndarray, correct: np.ndarray, p: str, beta: int) -> float:
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], correct[order]
    n = len(conf)
    edges = [i * beta for i in range(max(1, n // beta))] + [n]
    gaps, sizes = [], []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        gaps.append(abs(conf[start:stop].mean() - correct[start:stop].mean()))
        sizes.append(stop - start)
    w = np.array(sizes) / n
    return {"1": float((w * gaps).sum()), "2": float(np.sqrt((w * np.square(gaps)).sum())), "infty": max(gaps)}[p]


def test_calibration_error_hand_computed() -> None:
    confidence, correct = torch.tensor([0.9, 0.8, 0.6, 0.3]), torch.tensor([1, 0, 1, 0])
    # bins of 2 by confidence: {.3 wrong, .6 right} gap |.45 - .5| = .05; {.8 wrong, .9 right} gap .35
    assert calibration_error(confidence, correct, p="1", beta=2) == pytest.approx(0.2)
    assert calibration_error(confidence, correct, p="2", beta=2) == pytest.approx(0.25)
    assert calibration_error(confidence, correct, p="infty", beta=2) == pytest.approx(0.35)
    assert calibration_error(confidence, correct, beta=100) == pytest.approx(abs(0.65 - 0.5))  # one bin


@pytest.mark.parametrize("p", ["1", "2", "infty"])
@pytest.mark.parametrize(("n", "beta"), [(1000, 100), (1037, 50), (30, 100)])
def test_calibration_error_matches_a_loop_over_bins(p: str, n: int, beta: int) -> None:
    g = torch.Generator().manual_seed(n)
    confidence = torch.rand(n, generator=g)
    correct = (torch.rand(n, generator=g) < confidence**2).long()  # overconfident
    expected = _calibration_reference(confidence.double().numpy(), correct.numpy(), p, beta)
    assert calibration_error(confidence, correct, p=p, beta=beta) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        calibration_error(confidence, correct, p="3")


def test_aurra_matches_the_reference_without_ties_and_averages_ties() -> None:
    g = torch.Generator().manual_seed(7)
    confidence = torch.rand(500, generator=g)
    correct = (torch.rand(500, generator=g) < confidence).long()
    order = np.argsort(-confidence.numpy())
    reference = np.mean(np.cumsum(correct.numpy()[order]) / np.arange(1, 501))
    assert aurra(confidence, correct) == pytest.approx(reference, rel=1e-12)
    # ties: expected accuracy over the orders of the tied samples, independent of their input order
    assert aurra(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert aurra(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([1, 0, 1])) == pytest.approx((1 + 0.75 + 2 / 3) / 3)
    tied = (confidence * 5).round()
    perm = torch.randperm(500, generator=g)
    assert aurra(tied, correct) == pytest.approx(aurra(tied[perm], correct[perm]), rel=1e-12)


def test_calc_openness() -> None:
    assert calc_openness(10, 10, 10) == 0.0
    assert calc_openness(6, 10, 8) == pytest.approx(1 - math.sqrt(12 / 18))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        F.auroc(torch.rand(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        F.auroc(torch.tensor([0.0, math.nan]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="ID and OOD"):
        F.roc_curve(torch.rand(5), torch.zeros(5))
    with pytest.raises(ValueError, match="positive"):
        F.aupr(torch.rand(2), torch.tensor([0, -1]), positive="both")
    with pytest.raises(ValueError, match="tpr"):
        F.fpr_at_tpr(torch.rand(2), torch.tensor([0, -1]), 1.5)
    with pytest.raises(ValueError, match="ID samples"):
        F.accuracy(torch.zeros(2), -torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        aurra(torch.tensor([math.nan]), torch.tensor([1]))
