"""Registry of the logit -> score functions that detectors accept as their ``detector`` argument.

ASH, ReAct, SCALE and DICE map (shaped) logits to outlier scores with a callable, in pytorch-ood by
default ``EnergyBased.score``. A saved state cannot hold a callable, so it stores the callable's
*name* here instead: ``score_function_name(fn)`` on saving (``score_hparams``: a detector's hyperparameters with
it), ``score_function(name)`` on loading.
Only the static ``score`` functions of the classes below can be saved; a custom callable works for
scoring but :func:`ood_core.state.save_detector` then raises ``ValueError``.

Every registered function takes ``B x K`` (or ``B x K x H x W``) logits, class axis 1, and returns
scores where higher means more OOD.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import Tensor

ScoreFunction = Callable[[Tensor], Tensor]

#: names that can be saved; each is a class of :mod:`ood_core.detector` with a static ``score``
SCORE_FUNCTION_NAMES: tuple[str, ...] = ("EnergyBased", "MaxSoftmax", "MaxLogit", "Entropy", "GEN")

DEFAULT_SCORE_FUNCTION = "EnergyBased"


def score_function(name: str) -> ScoreFunction:
    """The static ``score`` function of the detector class ``name`` (imported on first use).

    :raises ValueError: when ``name`` is not one of :data:`SCORE_FUNCTION_NAMES`
    """
    if name not in SCORE_FUNCTION_NAMES:
        raise ValueError(f"unknown score function {name!r}; expected one of {', '.join(SCORE_FUNCTION_NAMES)}")
    package = importlib.import_module("ood_core.detector")
    fn: ScoreFunction = getattr(package, name).score
    return fn


def score_function_name(fn: Callable[..., Tensor]) -> str:
    """The registry name of ``fn``, the inverse of :func:`score_function`.

    :raises ValueError: for any other callable (a lambda, a ``functools.partial``, a bound method ...),
        because it cannot be stored in a saved state
    """
    for name in SCORE_FUNCTION_NAMES:
        try:
            candidate = score_function(name)
        except ImportError:  # a detector module that is not available cannot have produced ``fn``
            continue
        if fn == candidate:
            return name
    raise ValueError(
        f"the score callable {fn!r} cannot be saved: only the static score functions of "
        f"{', '.join(SCORE_FUNCTION_NAMES)} can (pass e.g. detector=EnergyBased.score or detector='EnergyBased')"
    )


def score_hparams(owner: str, fn: Callable[..., Tensor], **others: Any) -> dict[str, Any]:
    """The saved hyperparameters of a detector with a score callable: ``others`` and ``"detector"`` (the
    callable's registry name); ``ValueError`` saying that ``owner`` cannot be saved for a custom callable."""
    try:
        return {**others, "detector": score_function_name(fn)}
    except ValueError as exc:
        raise ValueError(f"{owner} cannot be saved: {exc}") from exc


def resolve_score_function(detector: Callable[..., Tensor] | str | None) -> Callable[..., Tensor]:
    """Constructor helper: ``None`` -> ``EnergyBased.score`` (pytorch-ood's default), a registry name ->
    its function, any other callable -> itself."""
    if detector is None:
        return score_function(DEFAULT_SCORE_FUNCTION)
    if isinstance(detector, str):
        return score_function(detector)
    if not callable(detector):
        raise TypeError(f"detector must be a callable mapping logits to scores or a name, got {detector!r}")
    return detector
