"""Mergeable, incremental fits (pytorch-ood#9): for every detector that needs a fit, shards merged in any order,
incremental calls and ``fit(loader)`` all finish to the state of one ``fit_features`` call on all the data."""

from __future__ import annotations

import pytest
import torch

from ood_core.api import FIT_SIGNATURE_KEY
from ood_core.detector import KNN, RMD, EnergyBased, Mahalanobis, ReAct, ViM
from ood_core.gaussian import ClassGaussianStats, merge_scatter

from .fit_cases import CASES, N, assert_same_state, batches, fit_shards

#: uneven shards (one of a single row) and a rank without data
SHARDS = [[0, 25, 40], [40, 41], [41, 90, 120, N], [N, N]]


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_shards_finish_to_the_state_of_one_stream(name: str) -> None:
    case = CASES[name]
    z, y = case.data()
    whole = case.make().fit_features(z, y)
    shards = [[b for b in batches(z, y, bounds) if b[1].numel()] for bounds in SHARDS]
    merged = fit_shards(case.make, shards)
    for det in merged:  # every shard merged the others in its own order: all agree
        assert_same_state(det, whole, case.tol)
        torch.testing.assert_close(det.predict_features(z), whole.predict_features(z), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_incremental_calls_equal_one_call_and_fit_over_a_loader(name: str) -> None:
    case = CASES[name]
    z, y = case.data()
    whole = case.make().fit_features(z, y)
    pieces = batches(z, y, [0, 7, 50, 51, 100, N])
    det = case.make().begin_fit()
    passes = 0
    while True:
        assert det.fit_pass == passes
        for zb, yb in pieces:
            det.partial_fit_features(zb, yb)
        stats = det.fit_statistics()
        assert all(t.device.type == "cpu" and t.is_contiguous() for t in stats.values())
        passes += 1
        if det.finish_pass():
            break
    assert passes == det.fit_passes == whole.fit_passes
    assert_same_state(det, whole, case.tol)
    if not isinstance(z, list):  # fit(loader) runs the network (identity here), as often as there are passes
        det = case.make()
        det.model = det.backbone = torch.nn.Identity()  # type: ignore[assignment]
        assert_same_state(det.fit(pieces), whole, case.tol)


def test_two_pass_fit_of_a_one_shot_iterator_keeps_the_outputs_of_the_first_pass() -> None:
    z, y = CASES["ViM"].data()
    whole = CASES["ViM"].make().fit_features(z, y)
    det = CASES["ViM"].make()
    det.model = torch.nn.Identity()
    det.fit(iter(batches(z, y, [0, 60, N])))
    assert_same_state(det, whole, CASES["ViM"].tol)


def test_begin_fit_drops_partial_statistics_and_refits() -> None:
    z, y = CASES["Mahalanobis"].data()
    det = Mahalanobis(None).fit_features(z, y)
    assert det.is_fitted
    det.partial_fit_features(z + 100.0, y)
    assert not det.is_fitted  # a fit in progress: the old state no longer counts
    det.begin_fit().partial_fit_features(z[:80], y[:80])
    assert det.finish_pass()
    assert_same_state(det, Mahalanobis(None).fit_features(z[:80], y[:80]), (1e-6, 1e-5))


def test_detectors_without_a_fit_have_no_passes() -> None:
    for det in (EnergyBased(None), ReAct(None, torch.nn.Linear(4, 2), 1.0)):
        assert det.fit_passes == 0 and det.is_fitted
        det.begin_fit().partial_fit_features(torch.rand(3, 4), torch.zeros(3))
        assert det.finish_pass() and det.is_fitted
        assert set(det.fit_statistics()) == {FIT_SIGNATURE_KEY}


def test_merging_statistics_of_another_class_hparams_pass_or_width_is_refused() -> None:
    z, y = CASES["Mahalanobis"].data()
    maha = Mahalanobis(None).partial_fit_features(z, y)
    with pytest.raises(ValueError, match="'Mahalanobis' into a 'RMD'"):
        RMD(None).merge_fit_statistics(maha.fit_statistics())
    with pytest.raises(ValueError, match="other hyperparameters"):
        KNN(None, k=4).merge_fit_statistics(KNN(None, k=3).partial_fit_features(z, y).fit_statistics())
    vim = CASES["ViM"].make().partial_fit_features(z, y)
    pass0 = vim.fit_statistics()
    assert not vim.finish_pass()
    with pytest.raises(ValueError, match="pass 0 .* into pass 1"):
        vim.merge_fit_statistics(pass0)
    with pytest.raises(ValueError, match="feature dimension"):
        Mahalanobis(None).partial_fit_features(z[:, :5], y).merge_fit_statistics(maha.fit_statistics())
    with pytest.raises(ValueError, match=FIT_SIGNATURE_KEY):
        Mahalanobis(None).merge_fit_statistics(
            {k: v for k, v in maha.fit_statistics().items() if k != FIT_SIGNATURE_KEY}
        )
    stats = {k: v for k, v in maha.fit_statistics().items() if k != "gram"}
    with pytest.raises(ValueError, match="must hold"):
        Mahalanobis(None).merge_fit_statistics(stats)


def test_scatter_merge_formula_on_a_hand_computed_case() -> None:
    # class 0: shard a = {0, 2} (mean 1, scatter 2), shard b = {4} (mean 4, scatter 0); together {0, 2, 4}:
    # mean 2, scatter 8 = 2 + 0 + (2 * 1 / 3) * (4 - 1)^2. Class 1 only in a: {1, 3}, mean 2, scatter 2.
    n, mean, scatter = merge_scatter(
        torch.tensor([2.0, 2.0]),
        torch.tensor([[1.0], [2.0]]),
        torch.tensor([[4.0]]),  # pooled over both classes: 2 + 2
        torch.tensor([1.0, 0.0]),
        torch.tensor([[4.0], [0.0]]),
        torch.tensor([[0.0]]),
    )
    torch.testing.assert_close(n, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(mean, torch.tensor([[2.0], [2.0]]))
    torch.testing.assert_close(scatter, torch.tensor([[10.0]]))
    # the same through the streaming statistics: their references differ, a plain sum would not do
    a, b = ClassGaussianStats(), ClassGaussianStats()
    a.update(torch.tensor([[0.0], [2.0], [1.0], [3.0]], dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    b.update(torch.tensor([[4.0]], dtype=torch.float64), torch.tensor([0]))
    plain = {k: a.to_tensors()[k] + b.to_tensors()[k].expand_as(a.to_tensors()[k]) for k in ("sums", "gram")}
    a.merge(b.to_tensors())
    counts, means, cov = a.finish()
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(means, torch.tensor([[2.0], [2.0]], dtype=torch.float64))
    torch.testing.assert_close(cov, torch.tensor([[10.0 / 5]], dtype=torch.float64))
    assert a.gram is not None and not torch.equal(plain["gram"], a.gram)


def test_gaussian_merge_of_shards_with_other_classes_and_float64_is_exact_to_rounding() -> None:
    g = torch.Generator().manual_seed(5)
    z = 1e3 + torch.randn(300, 4, generator=g, dtype=torch.float64)  # far from 0: cancellation would show
    y = torch.randint(0, 4, (300,), generator=g)
    whole = ClassGaussianStats()
    whole.update(z, y)
    parts = [ClassGaussianStats() for _ in range(3)]
    parts[0].update(z[:100][y[:100] < 2], y[:100][y[:100] < 2])  # only classes 0, 1
    parts[1].update(z[:100][y[:100] >= 2], y[:100][y[:100] >= 2])
    parts[2].update(z[100:], y[100:])
    merged = ClassGaussianStats()
    for part in (parts[2], parts[0], parts[1]):
        merged.merge(part.to_tensors())
    for got, want in zip(merged.finish(), whole.finish(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


def test_vim_fit_is_bounded_in_memory_no_features_are_kept() -> None:
    z, y = CASES["ViM"].data()
    det = ViM(None, 2, torch.rand(3, 6), torch.rand(3)).partial_fit_features(z, y)
    assert {k: tuple(v.shape) for k, v in det.fit_statistics().items() if k != FIT_SIGNATURE_KEY} == {
        "count": (),
        "moment": (6, 6),
    }
