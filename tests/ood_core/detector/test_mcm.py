import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core.api import InvalidStateError
from ood_core.detector import MCM
from ood_core.state import load_detector, save_detector

from .common import assert_roundtrip


def test_score_on_a_hand_computed_case() -> None:
    det = MCM(None, torch.tensor([[2.0, 0.0], [0.0, 5.0]]))  # normalized to the unit vectors
    # z = (3, 4): cosines 0.6 and 0.8; tau = 1: -e^0.8 / (e^0.6 + e^0.8)
    expected = -math.exp(0.8) / (math.exp(0.6) + math.exp(0.8))
    torch.testing.assert_close(det.predict_features(torch.tensor([[3.0, 4.0]])), torch.tensor([expected]))
    # tau = 0.1: the cosines are divided by it
    cold = MCM(None, torch.eye(2), temperature=0.1).predict_features(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(cold, torch.tensor([-math.exp(8) / (math.exp(6) + math.exp(8))]))
    assert det.feature_dim == 2 and det.num_classes == 2 and det.fit_passes == 0


def test_ood_scores_higher_when_no_concept_matches() -> None:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(5, 32, generator=g)
    y = torch.arange(100) % 5
    images = text[y] + 0.5 * torch.randn(100, 32, generator=g)  # near their class's concept
    unrelated = torch.randn(100, 32, generator=g)
    encoder = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(32))
    det = MCM(encoder, text, temperature=0.05)
    assert det.predict(images).max() < det.predict(unrelated).min()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    det = MCM(None, torch.randn(4, 8), temperature=0.5)
    loaded = assert_roundtrip(det, torch.randn(6, 8), tmp_path)
    assert isinstance(loaded, MCM)
    torch.testing.assert_close(loaded.text_embeddings.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="C x D"):
        MCM(None, torch.randn(4))
    with pytest.raises(ValueError, match="temperature"):
        MCM(None, torch.randn(4, 8), temperature=0)


def test_a_state_with_unnormalized_embeddings_is_refused() -> None:
    det = MCM(None, torch.eye(3))
    det.text_embeddings = 2 * torch.eye(3)
    with pytest.raises(InvalidStateError, match="normalized"):
        load_detector(save_detector(det))
