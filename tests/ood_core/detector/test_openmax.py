import math

import numpy as np
import pytest
import torch
from scipy import stats

from ood_core.api import ModelNotSetException, RequiresFitException
from ood_core.detector import OpenMax
from ood_core.detector.openmax import weibull_mle

from .common import assert_roundtrip, separable_logits


def _hand_state(alpha: int = 2) -> OpenMax:
    """Two classes, centres (2, 0) and (0, 2); both CDFs 1 - exp(-d) (shape 1, scale 1, no shift)."""
    det = OpenMax(None, alpha=alpha)
    det.centers = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    det.weibull = torch.tensor([[1.0, 1.0, 0.0, 5.0], [1.0, 1.0, 0.0, 5.0]], dtype=torch.float64)
    det._mark_fitted()
    return det


def _softmax_first(values: list[float]) -> float:
    return math.exp(values[0]) / sum(math.exp(v) for v in values)


def test_openmax_formula_on_hand_computed_case() -> None:
    det = _hand_state()
    # v = (2, 0): class 0 ranks first at distance 0 (CDF 0, omega 1); class 1 ranks second (weight 1/2) at
    # distance 2 sqrt 2. Revised: (v0, v1, v2) = (0 * ..., 2, 0) -> unknown logit 0
    first = _softmax_first([0.0, 2.0, 0.0])
    # v = (1, 3): class 1 first (weight 1) at distance sqrt 2, class 0 second (weight 1/2) at distance sqrt 10
    w1 = math.exp(-math.sqrt(2.0))
    w0 = 1.0 - 0.5 * (1.0 - math.exp(-math.sqrt(10.0)))
    second = _softmax_first([1.0 * (1.0 - w0) + 3.0 * (1.0 - w1), 1.0 * w0, 3.0 * w1])
    scores = det.predict_features(torch.tensor([[2.0, 0.0], [1.0, 3.0]]))
    torch.testing.assert_close(scores, torch.tensor([first, second]))


def test_alpha_one_revises_only_the_top_class() -> None:
    det = _hand_state(alpha=1)
    w1 = math.exp(-math.sqrt(2.0))
    expected = _softmax_first([3.0 * (1.0 - w1), 1.0, 3.0 * w1])
    torch.testing.assert_close(det.predict_features(torch.tensor([[1.0, 3.0]])), torch.tensor([expected]))


def test_weibull_cdf_matches_scipy_and_sits_on_its_tail() -> None:
    id_logits, _ = separable_logits(300, 3, seed=3)
    det = OpenMax(None, tailsize=20).fit_features(id_logits, id_logits.argmax(dim=1))
    shape, scale, shift, n_tail = det.weibull[0].tolist()
    assert n_tail == 20
    members = id_logits[id_logits.argmax(dim=1) == 0].double()
    dist = (members - det.centers[0]).norm(dim=1)
    tail = np.sort(dist.numpy())[-20:]
    assert shift == pytest.approx(10000.0 - tail.min())
    d = torch.from_numpy(tail)
    ours = OpenMax.weibull_cdf(d, det.weibull[0].expand(20, 4))
    theirs = stats.weibull_min.cdf(tail + shift, shape, scale=scale)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-9)
    # the model sits on its tail: increasing over it, from low to high, about half below its median
    assert bool((ours.diff() >= 0).all()) and ours[0] < 0.5 < ours[-1] and ours[-1] > 0.8
    assert 0.3 < float(ours.median()) < 0.7


def test_weibull_mle_recovers_parameters_and_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    sample = stats.weibull_min.rvs(2.5, scale=3.0, size=4000, random_state=rng)
    shape, scale = weibull_mle(sample)
    assert shape == pytest.approx(2.5, rel=0.05) and scale == pytest.approx(3.0, rel=0.05)
    # a libMR-shifted tail (values near 10^4, huge shape): at least as likely as scipy's Nelder-Mead optimum
    tail = np.sort(rng.normal(5.0, 1.0, 500))[-25:]
    tail = tail + 10000.0 - tail.min()
    ours = weibull_mle(tail)
    ref_shape, _, ref_scale = stats.weibull_min.fit(tail, floc=0.0)
    assert ours == pytest.approx((ref_shape, ref_scale), rel=1e-3)
    loglik = stats.weibull_min.logpdf(tail, ours[0], scale=ours[1]).sum()
    assert loglik >= stats.weibull_min.logpdf(tail, ref_shape, scale=ref_scale).sum() - 1e-9


def test_centres_use_only_correctly_classified_id_samples() -> None:
    logits = torch.tensor([[3.0, 0.0], [5.0, 1.0], [0.0, 4.0], [0.0, 2.0], [9.0, 0.0], [7.0, 7.5]])
    labels = torch.tensor([0, 0, 1, 1, 1, -1])  # (9, 0) is misclassified, (7, 7.5) is OOD
    det = OpenMax(None, tailsize=2).fit_features(logits, labels)
    torch.testing.assert_close(det.centers, torch.tensor([[4.0, 0.5], [0.0, 3.0]], dtype=torch.float64))


def test_class_without_correct_samples_is_fully_revised() -> None:
    logits = torch.tensor([[3.0, 0.0], [5.0, 1.0], [4.0, 0.5]])
    det = OpenMax(None, tailsize=3).fit_features(logits, torch.tensor([0, 0, 0]))
    assert det.weibull[1, 3] == 0  # no model for class 1: its CDF is 1
    # a sample ranked as class 1 (alpha = 2, top rank weight 1) loses all of its class-1 activation
    score = det.predict_features(torch.tensor([[0.0, 6.0]]))
    assert score.item() > 0.9


def test_requires_fit() -> None:
    with pytest.raises(RequiresFitException):
        OpenMax(None).predict_features(torch.randn(2, 3))


def test_ood_scores_higher() -> None:
    id_fit, _ = separable_logits(1000, 5, seed=1)
    id_test, ood_test = separable_logits(200, 5, seed=2)
    det = OpenMax(None).fit_features(id_fit, id_fit.argmax(dim=1))
    id_scores, ood_scores = det.predict_features(id_test), det.predict_features(ood_test)
    auroc = (ood_scores.unsqueeze(1) > id_scores.unsqueeze(0)).double().mean()
    assert auroc > 0.9
    assert ood_scores.median() > id_scores.median()


def test_predict_passes_input_through_model_and_needs_it() -> None:
    det = _hand_state()
    x = torch.randn(4, 2)
    det.model = torch.nn.Identity()
    torch.testing.assert_close(det(x), det.predict_features(x))
    det.model = None
    with pytest.raises(ModelNotSetException):
        det.predict(x)


def test_roundtrip_with_cosine_distance(tmp_path) -> None:
    id_logits, ood_logits = separable_logits(200, 4)
    det = OpenMax(None, tailsize=10, alpha=3, euclid_weight=0.5).fit_features(id_logits, id_logits.argmax(dim=1))
    loaded = assert_roundtrip(det, torch.cat([id_logits[:5], ood_logits[:5]]), tmp_path)
    assert (loaded.tailsize, loaded.alpha, loaded.euclid_weight) == (10, 3, 0.5)
    assert loaded.num_classes == 4
