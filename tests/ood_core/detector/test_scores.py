import functools

import pytest
import torch

import ood_core.detector as detectors
from ood_core.detector import EnergyBased, MaxLogit
from ood_core.detector.scores import (
    SCORE_FUNCTION_NAMES,
    resolve_score_function,
    score_function,
    score_function_name,
)


@pytest.mark.parametrize("name", SCORE_FUNCTION_NAMES)
def test_name_maps_to_the_static_score_of_that_class_and_back(name: str) -> None:
    fn = score_function(name)
    assert fn == getattr(detectors, name).score
    assert score_function_name(fn) == name


@pytest.mark.parametrize("name", SCORE_FUNCTION_NAMES)
def test_registered_functions_score_classification_and_segmentation_logits(name: str) -> None:
    fn = score_function(name)
    assert fn(torch.randn(3, 4)).shape == (3,)
    assert fn(torch.randn(2, 4, 5, 6)).shape == (2, 5, 6)


def test_unknown_name_is_rejected_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="EnergyBased"):
        score_function("Energy")


@pytest.mark.parametrize(
    "custom",
    [lambda logits: -logits.amax(dim=1), functools.partial(EnergyBased.score, t=2.0), EnergyBased(None).predict],
)
def test_custom_callables_have_no_name(custom) -> None:
    with pytest.raises(ValueError, match="cannot be saved"):
        score_function_name(custom)


def test_resolve_defaults_to_energy_and_accepts_names_and_callables() -> None:
    assert resolve_score_function(None) == EnergyBased.score
    assert resolve_score_function("MaxLogit") == MaxLogit.score

    def custom(logits: torch.Tensor) -> torch.Tensor:
        return logits.sum(dim=1)

    assert resolve_score_function(custom) is custom
    with pytest.raises(TypeError):
        resolve_score_function(3)  # type: ignore[arg-type]
