import math

import pytest
import torch

from ood_core.api import ModelNotSetException, RequiresFitException
from ood_core.detector import KLMatching

from .common import assert_roundtrip, separable_logits


def _kl(p: list[float], d: list[float]) -> float:
    return sum(pi * math.log(pi / di) for pi, di in zip(p, d, strict=True))


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def _fitted() -> KLMatching:
    # predicted class 0: posteriors [0.8, 0.2], [0.6, 0.4] -> template [0.7, 0.3]
    # predicted class 1: posterior [0.1, 0.9] -> template [0.1, 0.9]; the labels do not matter
    fit = _logits([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    return KLMatching(None).fit_features(fit, torch.tensor([1, 1, 0]))


def test_templates_are_mean_posteriors_grouped_by_predicted_class() -> None:
    det = _fitted()
    torch.testing.assert_close(det.templates, torch.tensor([[0.7, 0.3], [0.1, 0.9]]))
    assert det.counts.tolist() == [2, 1]


def test_score_is_minimum_kl_over_templates_on_hand_computed_case() -> None:
    det = _fitted()
    # [0.45, 0.55] is predicted as class 1 but is closer to the class-0 template: the paper's minimum
    # picks template 0, the seed's one-liner (template of the predicted class) would pick template 1
    p = [0.45, 0.55]
    to_0, to_1 = _kl(p, [0.7, 0.3]), _kl(p, [0.1, 0.9])
    assert to_0 < to_1
    torch.testing.assert_close(det.predict_features(_logits([p])), torch.tensor([to_0]))


def test_classes_never_predicted_are_left_out() -> None:
    # three classes, but no fitting sample is predicted as class 2
    fit = _logits([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    det = KLMatching(None).fit_features(fit, torch.tensor([0, 1]))
    assert det.counts.tolist() == [1, 1, 0]
    p = [0.1, 0.1, 0.8]
    expected = min(_kl(p, [0.7, 0.2, 0.1]), _kl(p, [0.2, 0.7, 0.1]))
    scores = det.predict_features(_logits([p]))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.tensor([expected]))


def test_ood_samples_are_ignored_in_fit() -> None:
    fit = _logits([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    outliers = _logits([[0.99, 0.01], [0.5, 0.5]])
    det = KLMatching(None).fit_features(torch.cat([fit, outliers]), torch.tensor([0, 0, 0, -1, -1]))
    torch.testing.assert_close(det.templates, _fitted().templates)


def test_streaming_fit_on_loader_matches_fit_features() -> None:
    id_logits, _ = separable_logits(90, 4)
    labels = torch.zeros(90, dtype=torch.long)
    loader = [(id_logits[i : i + 30], labels[i : i + 30]) for i in range(0, 90, 30)]
    from_loader = KLMatching(torch.nn.Identity()).fit(loader)
    direct = KLMatching(None).fit_features(id_logits, labels)
    torch.testing.assert_close(from_loader.templates, direct.templates)
    assert torch.equal(from_loader.counts, direct.counts)


def test_requires_fit() -> None:
    with pytest.raises(RequiresFitException):
        KLMatching(None).predict_features(torch.randn(2, 3))


def test_ood_scores_higher() -> None:
    id_logits, ood_logits = separable_logits()
    det = KLMatching(None).fit_features(id_logits, torch.zeros(len(id_logits), dtype=torch.long))
    assert det.predict_features(ood_logits).min() > det.predict_features(id_logits).max()


def test_predict_passes_input_through_model_and_needs_it() -> None:
    det = _fitted()
    x = torch.randn(4, 2)
    det.model = torch.nn.Identity()
    torch.testing.assert_close(det(x), det.predict_features(x))
    det.model = None
    with pytest.raises(ModelNotSetException):
        det.predict(x)


def test_roundtrip(tmp_path) -> None:
    id_logits, ood_logits = separable_logits()
    det = KLMatching(None).fit_features(id_logits, torch.zeros(len(id_logits), dtype=torch.long))
    loaded = assert_roundtrip(det, torch.cat([id_logits[:5], ood_logits[:5]]), tmp_path)
    assert loaded.num_classes == 5
