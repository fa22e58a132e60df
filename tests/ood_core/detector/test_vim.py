import math

import pytest
import torch

from ood_core.api import RequiresFitException
from ood_core.detector import ViM

from .common import assert_roundtrip

# second moment diag(9, 1): principal direction x, residual y with |y| = 1 everywhere
POINTS = torch.tensor([[3.0, 1.0], [3.0, -1.0], [-3.0, 1.0], [-3.0, -1.0]])
LABELS = torch.tensor([0, 1, 0, 1])


def test_hand_computed_case_with_identity_head() -> None:
    det = ViM(None, d=1, w=torch.eye(2), b=torch.zeros(2)).fit_features(POINTS, LABELS)
    # max logits 3, 3, 1, -1 -> mean 1.5 ; mean residual norm 1 -> alpha 1.5
    torch.testing.assert_close(det.alpha, torch.tensor([1.5], dtype=torch.float64))
    query = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    expected = torch.tensor([1.5 * 2 - math.log(1 + math.e**2), -math.log(math.e**2 + 1)])
    torch.testing.assert_close(det.predict_features(query), expected)


def test_origin_is_minus_pinv_w_times_b() -> None:
    b = torch.tensor([1.0, -2.0])
    det = ViM(None, d=1, w=torch.eye(2), b=b)
    torch.testing.assert_close(det.u, torch.tensor([-1.0, 2.0], dtype=torch.float64))
    # shifting the data by u leaves logits - b and residuals unchanged: same alpha and scores as above
    det.fit_features(POINTS + det.u.float(), LABELS)
    torch.testing.assert_close(det.alpha, torch.tensor([1.5], dtype=torch.float64))
    query = torch.tensor([[0.0, 2.0]]) + det.u.float()
    torch.testing.assert_close(det.predict_features(query), torch.tensor([3.0 - math.log(1 + math.e**2)]))


def test_score_is_log_odds_of_the_virtual_class() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    det = ViM(None, d=2, w=w, b=b).fit_features(torch.randn(50, 6, generator=g), torch.zeros(50).long())
    z = torch.randn(7, 6, generator=g).double()
    centred = z - det.u
    residual = centred - centred @ det.principal @ det.principal.T  # projection onto the complement
    virtual = det.alpha * residual.norm(dim=1, keepdim=True)
    p_virtual = torch.softmax(torch.cat([z @ w.double().T + b.double(), virtual], 1), 1)[:, -1]
    expected = torch.log(p_virtual / (1 - p_virtual))  # the paper's probability, as log-odds
    torch.testing.assert_close(det.predict_features(z.float()), expected.float(), rtol=1e-4, atol=1e-4)


def test_ood_scores_higher_on_separable_data() -> None:
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    w = 4.0 * basis[:, :4].T  # 4 classes, logits read the principal directions
    y = torch.randint(0, 4, (300,), generator=g)
    id_feats = torch.nn.functional.one_hot(y, 4).float() @ basis[:, :4].T * 3 + 0.05 * torch.randn(300, 16, generator=g)
    det = ViM(None, d=4, w=w, b=torch.zeros(4)).fit_features(id_feats, y)
    ood_feats = 2.0 * torch.randn(50, 12, generator=g) @ basis[:, 4:].T  # energy in the residual space
    assert det.predict_features(ood_feats).min() > det.predict_features(id_feats[:50]).max()


def test_d_too_large_is_reduced_with_a_warning() -> None:
    det = ViM(None, d=5, w=torch.eye(2), b=torch.zeros(2))
    with pytest.warns(UserWarning, match="d=5"):
        det.fit_features(POINTS, LABELS)
    assert det.d == 1


def test_requires_fit_and_roundtrip(tmp_path) -> None:
    det = ViM(torch.nn.Identity(), d=1, w=torch.eye(2), b=torch.tensor([0.5, -0.5]))
    with pytest.raises(RequiresFitException):
        det.predict(POINTS)
    det.fit(zip(POINTS.split(2), LABELS.split(2), strict=True))
    torch.testing.assert_close(det.predict(POINTS), det.predict_features(POINTS))
    loaded = assert_roundtrip(det, torch.randn(5, 2), tmp_path, model=torch.nn.Identity())
    assert loaded.d == 1
    torch.testing.assert_close(loaded.w, det.w)
