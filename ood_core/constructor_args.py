"""Constructor-argument helpers shared by the detectors (pytorch-ood's argument names and aliases).

:func:`model_or_encoder` accepts the network as ``model`` or as ``encoder`` (pytorch-ood 0.4's name for it);
:func:`required` reports required arguments that follow an optional one. :mod:`ood_core.api` re-exports both.
"""

from __future__ import annotations

from typing import Any


def model_or_encoder(model: Any, encoder: Any, owner: str) -> Any:
    """The network given as ``model`` or as ``encoder`` (pytorch-ood 0.4's name for it), not both."""
    if model is not None and encoder is not None:
        raise TypeError(f"{owner} got both model and encoder: pass the network once")
    net = model if model is not None else encoder
    if net is not None and not callable(net):
        raise TypeError(f"{owner} model must be a callable network, got {type(net).__name__}")
    return net


def required(owner: str, **arguments: Any) -> None:
    """``TypeError`` naming the first of ``arguments`` left at ``None`` (required arguments that follow an
    optional ``model`` / ``encoder``, which Python cannot express as required keywords)."""
    for name, value in arguments.items():
        if value is None:
            raise TypeError(f"{owner}() missing required argument: '{name}'")
