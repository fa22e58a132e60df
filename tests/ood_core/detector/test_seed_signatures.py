"""Seed-style constructor calls (pytorch-ood's documented API) work unchanged: KNN's scikit-learn keywords,
ReAct's ``threshold=1.0, detector=None`` order, and ``encoder=`` where pytorch-ood 0.4 renamed ``model``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ood_core.detector import DICE, KNN, RMD, SHE, EnergyBased, Mahalanobis, ReAct, ViM

from .common import assert_roundtrip


def test_knn_takes_the_seeds_scikit_learn_keywords(tmp_path: Any) -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[0.6, 0.8]])  # unit: distances sqrt(0.8), sqrt(0.4), sqrt(3.2)
    nearest = KNN(nn.Identity(), n_neighbors=1, algorithm="brute", leaf_size=10, n_jobs=-1, metric="euclidean")
    nearest.fit_features(bank, torch.zeros(3))
    assert nearest.k == 1 and float(nearest.predict_features(query)) == pytest.approx(0.4**0.5)  # seed: nearest
    second = KNN(None, n_neighbors=2, metric="minkowski", p=2).fit_features(bank, torch.zeros(3))
    assert float(second.predict_features(query)) == pytest.approx(0.8**0.5)
    assert KNN(None, k=2).hparams() == second.hparams() == {"k": 2, "normalize": True}
    assert_roundtrip(second, query, tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword argument 'neighbours'"):
        KNN(None, neighbours=3)
    with pytest.raises(TypeError, match="give one of them"):
        KNN(None, k=3, n_neighbors=4)
    with pytest.raises(ValueError, match="Euclidean"):
        KNN(None, metric="cosine")
    with pytest.raises(ValueError, match="Euclidean"):
        KNN(None, p=1)


def test_react_takes_the_seeds_positional_order() -> None:
    head = nn.Linear(3, 2)
    det = ReAct(nn.Identity(), head, 0.5, EnergyBased.score)
    x = torch.tensor([[0.2, 0.9, 3.0]])
    torch.testing.assert_close(det(x), EnergyBased.score(head(torch.tensor([[0.2, 0.5, 0.5]]))))
    assert det.fit(iter([])) is det  # a fixed threshold needs no fit: the loader is not read


def _net(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


ENCODER_CALLS: dict[str, Any] = {
    "Mahalanobis": lambda **net: Mahalanobis(**net, eps=0.0),
    "RMD": lambda **net: RMD(**net),
    "KNN": lambda **net: KNN(**net, k=1),
    "SHE": lambda **net: SHE(**net, head=nn.Linear(2, 2)),
    "ViM": lambda **net: ViM(**net, d=1, w=torch.eye(2), b=torch.zeros(2)),
    "DICE": lambda **net: DICE(**net, w=torch.eye(2), b=torch.zeros(2), p=0.5),
}


@pytest.mark.parametrize("name", sorted(ENCODER_CALLS))
def test_encoder_is_the_model_under_pytorch_ood_0_4s_name(name: str) -> None:
    make = ENCODER_CALLS[name]
    assert make(encoder=_net).model is _net
    assert make(model=_net).model is _net
    with pytest.raises(TypeError, match="both model and encoder"):
        make(model=_net, encoder=_net)


def test_required_arguments_after_an_optional_encoder_are_still_required() -> None:
    with pytest.raises(TypeError, match="missing required argument: 'd'"):
        ViM(encoder=_net, w=torch.eye(2), b=torch.zeros(2))
    with pytest.raises(TypeError, match="missing required argument: 'p'"):
        DICE(encoder=_net, w=torch.eye(2), b=torch.zeros(2))
    with pytest.raises(TypeError, match="callable network"):
        Mahalanobis(encoder="not a network")
