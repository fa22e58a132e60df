import math

import pytest
import torch

from ood_core.api import RequiresFitException
from ood_core.detector import KNN
from ood_core.detector import knn as knn_module

from .common import assert_roundtrip


def test_hand_computed_unnormalized() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    det = KNN(None, k=2, normalize=False).fit_features(bank, torch.zeros(4).long())
    # (0, 0): distances 0, 1, 2, 3 -> 1 ; (1, 1): sqrt 2, 1, sqrt 2, sqrt 5 -> sqrt 2
    torch.testing.assert_close(
        det.predict_features(torch.tensor([[0.0, 0.0], [1.0, 1.0]])), torch.tensor([1.0, math.sqrt(2)])
    )


def test_hand_computed_normalized_and_ood_labels_ignored() -> None:
    bank = torch.tensor([[5.0, 0.0], [0.0, 0.5], [-2.0, 0.0], [9.0, 9.0]])
    det = KNN(None, k=2).fit_features(bank, torch.tensor([0, 1, 0, -1]))
    assert det.bank.shape == (3, 2)
    # unit bank (1, 0), (0, 1), (-1, 0); query (2, 0) -> (1, 0): distances 0, sqrt 2, 2 -> sqrt 2
    torch.testing.assert_close(det.predict_features(torch.tensor([[2.0, 0.0]])), torch.tensor([math.sqrt(2)]))


@pytest.mark.parametrize("normalize", [True, False])
def test_blocked_search_matches_brute_force(monkeypatch, normalize: bool) -> None:
    monkeypatch.setattr(knn_module, "MAX_BLOCK_ELEMENTS", 1500)  # two queries per block
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(700, 6, generator=g) + 3.0, torch.randn(90, 6, generator=g)
    det = KNN(None, k=7, normalize=normalize).fit_features(bank, torch.zeros(700).long())
    prep = (lambda z: z / z.norm(dim=1, keepdim=True)) if normalize else (lambda z: z)
    expected = torch.cdist(prep(query).double(), prep(bank).double()).sort(1).values[:, 6]
    torch.testing.assert_close(det.predict_features(query).double(), expected, rtol=1e-5, atol=1e-6)


def test_ood_scores_higher_on_separable_data() -> None:
    g = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=g))
    y = torch.randint(0, 3, (300,), generator=g)
    det = KNN(None, k=5).fit_features(directions[y] + 0.05 * torch.randn(300, 16, generator=g), y)
    id_test = directions[torch.arange(30) % 3] + 0.05 * torch.randn(30, 16, generator=g)
    ood_test = torch.randn(30, 16, generator=g)
    assert det.predict_features(ood_test).min() > det.predict_features(id_test).max()


def test_k_larger_than_bank_and_requires_fit() -> None:
    with pytest.raises(RequiresFitException):
        KNN(None).predict_features(torch.randn(2, 3))
    with pytest.raises(ValueError, match="k=5"):
        KNN(None, k=5).fit_features(torch.randn(4, 3), torch.zeros(4).long())


def test_roundtrip(tmp_path) -> None:
    det = KNN(torch.nn.Identity(), k=3, normalize=False).fit(
        zip(torch.randn(20, 4).split(5), torch.zeros(20).long().split(5), strict=True)
    )
    torch.testing.assert_close(det.predict(torch.ones(2, 4)), det.predict_features(torch.ones(2, 4)))
    loaded = assert_roundtrip(det, torch.randn(5, 4), tmp_path)
    assert (loaded.k, loaded.normalize, loaded.feature_dim) == (3, False, 4)


def test_bank_does_not_alias_the_fitted_tensor() -> None:
    x = torch.randn(10, 3)
    det = KNN(None, k=2, normalize=False).fit_features(x, torch.zeros(10).long())
    before = det.predict_features(torch.zeros(1, 3))
    x.mul_(100.0)
    torch.testing.assert_close(det.predict_features(torch.zeros(1, 3)), before)


@pytest.mark.parametrize(
    ("factors", "block"),
    [((4, 16), 40_000), ((4, 16), 200_000), ((1,), 40_000)],  # (1,): every query falls back to the exhaustive search
)
def test_bfloat16_preselection_is_exact(monkeypatch, factors: tuple[int, ...], block: int) -> None:
    """The bfloat16 pre-selection (large normalized banks) returns the exhaustive search's k-th distance, also
    with duplicates, near-ties and queries equal to bank rows (distance 0)."""
    monkeypatch.setattr(knn_module, "PRESELECT_MIN_BANK", 1)
    monkeypatch.setattr(knn_module, "bf16_matmul_is_fast", lambda device_type: True)  # whatever this CPU has
    monkeypatch.setattr(knn_module, "PRESELECT_FACTORS", factors)
    monkeypatch.setattr(knn_module, "MAX_BLOCK_ELEMENTS", block)  # several query blocks (of 26, or 128 padded rows)
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(8, 64, generator=g)
    y = torch.randint(0, 8, (3000,), generator=g)
    bank = centres[y] + 0.7 * torch.randn(3000, 64, generator=g)
    bank[1000:1100] = bank[:100]  # exact duplicates
    bank[2000:2050] = bank[2050:2100] + 1e-4 * torch.randn(50, 64, generator=g)  # near-ties
    det = KNN(None, k=10).fit_features(bank, y)
    query = torch.cat([centres + 0.7 * torch.randn(8, 64, generator=g), bank[:20], torch.randn(30, 64, generator=g)])
    unit = lambda z: z / z.norm(dim=1, keepdim=True)  # noqa: E731
    expected = torch.cdist(unit(query).double(), unit(bank).double()).sort(1).values[:, 9]
    torch.testing.assert_close(det.predict_features(query).double(), expected, rtol=1e-5, atol=2e-6)
    # and the cached bfloat16 bank follows the bank when it changes
    det.bank = det.bank[:2000].clone()
    expected = torch.cdist(unit(query).double(), unit(bank[:2000]).double()).sort(1).values[:, 9]
    torch.testing.assert_close(det.predict_features(query).double(), expected, rtol=1e-5, atol=2e-6)


def test_bfloat16_preselection_only_where_bfloat16_is_fast(monkeypatch) -> None:
    """Without bfloat16 dot products (emulated bfloat16 is slower than float32) the exact search is used."""
    gate = knn_module.bf16_matmul_is_fast
    assert gate("cuda") and not gate("meta")
    monkeypatch.setattr(knn_module, "PRESELECT_MIN_BANK", 1)
    monkeypatch.setattr(knn_module, "bf16_matmul_is_fast", lambda device_type: False)
    called = []
    monkeypatch.setattr(knn_module, "preselected_kth_distance", lambda *args: called.append(args))
    det = KNN(None, k=2).fit_features(torch.randn(50, 8), torch.zeros(50).long())
    assert det.predict_features(torch.randn(4, 8)).shape == (4,)
    assert not called


def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


@pytest.mark.parametrize("case", ["output", "query", "bank"])
def test_bfloat16_similarity_interval_holds_and_is_nearly_attained(case: str) -> None:
    """Every exact similarity lies in [lo(A), up(A)], and in each construction one error term is nearly attained
    (so a bound with that term any smaller would fail): the rounding of the GEMM output (bfloat16-exact inputs),
    of the query (bank rows along the query's rounding residual) and of the bank (the converse)."""
    g = torch.Generator().manual_seed(11)
    unit = lambda z: z / z.norm(dim=1, keepdim=True)  # noqa: E731
    q, bank = unit(torch.randn(16, 64, generator=g)), unit(torch.randn(3000, 64, generator=g))
    if case == "output":
        q, bank = _bf16_exact(q), _bf16_exact(bank)
    elif case == "query":  # exact bank rows, some along the queries' rounding residuals: only the queries round
        bank = _bf16_exact(unit(torch.cat([bank, q - _bf16_exact(q)])))
    else:  # exact queries along the residuals of the bank rows that round the most: only the bank rounds
        residual = bank - _bf16_exact(bank)
        q = _bf16_exact(unit(residual[residual.norm(dim=1).topk(16).indices]))
    low = bank.bfloat16()
    stats = knn_module.bank_rounding_stats(bank, low)
    stats[3] = 0.0  # bound on q.b itself (the key shift for non-unit rows is tested through predict_features)
    approx = q.bfloat16() @ low.T
    lo, up = knn_module.similarity_interval(approx, knn_module.similarity_slack(q, q.bfloat16(), stats))
    exact = q.double() @ bank.double().T
    assert bool((lo <= exact).all()) and bool((exact <= up).all())
    attained = ((exact - approx.double()).abs() / (up - approx.double())).max()
    assert attained > 0.8, float(attained)


def test_band_limits_keep_a_candidate_just_inside_the_bound() -> None:
    """k = 2, slack 0.01: a_k = 0.5, so L = 0.5 - 0.01 - 2^-9 = 0.48805 and U = 0.51195. 1.0 is certain
    (lo = 0.98609 > U); 0.478515625 (up = 0.48949) must stay a candidate, 0.4765625 (up = 0.48754) is excluded.
    Without the output-rounding term, or with half of it, 0.478515625 would be dropped."""
    values = torch.tensor(
        [[1.0, 0.5, 0.5, 0.478515625, 0.4765625], [1.0, 0.5, 0.5, 0.478515625, 0.478515625]]
    ).bfloat16()
    first, count, complete = knn_module.band_limits(values, torch.tensor([0.01, 0.01], dtype=torch.float64), 2)
    assert first.tolist() == [1, 1]
    assert count.tolist() == [4, 5]
    assert complete.tolist() == [True, False]  # the second row's last kept entry may still hide more candidates


@pytest.mark.parametrize("n", [1000, 1008])  # with and without tail columns (n mod 16)
def test_chunked_topk_equals_topk(n: int) -> None:
    """The two-level top-k returns the row's largest values, also with ties, with every top entry in one strided
    chunk (the chunk holds more than one of them), and with top entries in the tail columns."""
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(6, n, generator=g) * 4).round().bfloat16()  # few distinct values: many ties
    groups = n // knn_module.TOPK_CHUNK
    a[1, 3::groups] = 50.0  # a whole strided chunk (and, for n = 1000, tail columns) holds the largest values
    a[2, -8:] = 60.0  # the last columns: the tail when n = 1000
    values, indices = knn_module.chunked_topk(a, 40)
    torch.testing.assert_close(values, a.topk(40, dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(a.gather(1, indices), values, rtol=0, atol=0)
    assert bool((indices.sort(1).values.diff(dim=1) > 0).all())  # distinct columns
