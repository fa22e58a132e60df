"""The exceptions ood_core raises, all subclasses of :class:`OODError`.

They live in this module of their own, which imports nothing from ood_core, so that any module can raise
them without importing :mod:`ood_core.api` (which imports :mod:`ood_core.calibration` for its types).
:mod:`ood_core.api` re-exports every name, so ``from ood_core.api import InvalidStateError`` keeps working.
Each also derives from the built-in exception a caller would catch for the same mistake.
"""

from __future__ import annotations

__all__ = [
    "OODError",
    "RequiresFitException",
    "RequiresFittingException",
    "ModelNotSetException",
    "FeaturesNotSupportedError",
    "InvalidStateError",
]


class OODError(Exception):
    """Base class of every exception raised by ood_core."""


class RequiresFitException(OODError, RuntimeError):
    """The detector has to be fitted (``fit`` / ``fit_features`` or a loaded state) before it can predict."""


#: the name pytorch-ood 0.4 uses for :class:`RequiresFitException` (the same class)
RequiresFittingException = RequiresFitException


class ModelNotSetException(OODError, ValueError):
    """The method needs the network (``model``, ``backbone`` or ``head``) but none was given."""


class FeaturesNotSupportedError(OODError, NotImplementedError):
    """The detector needs the network in the loop (e.g. ODIN backpropagates, MCD samples dropout masks)
    and so cannot score pre-computed features."""


class InvalidStateError(OODError, ValueError):
    """A saved detector state (or calibration) is malformed, inconsistent or does not fit the model."""
