"""OOD detectors, one module each, with pytorch-ood's class names and constructor arguments."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES: dict[str, str] = {
    "MaxSoftmax": "msp",
    "MCD": "mcd",
    "TemperatureScaling": "temperature",
    "KLMatching": "klmatching",
    "Entropy": "entropy",
    "MaxLogit": "maxlogit",
    "OpenMax": "openmax",
    "EnergyBased": "energy",
    "WeightedEBO": "weighted_energy",
    "ODIN": "odin",
    "odin_preprocessing": "odin",
    "GEN": "gen",
    "Mahalanobis": "mahalanobis",
    "MultiMahalanobis": "multi_mahalanobis",
    "RMD": "rmd",
    "ViM": "vim",
    "KNN": "knn",
    "SHE": "she",
    "DICE": "dice",
    "ASH": "ash",
    "ReAct": "react",
    "SCALE": "scale",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'ood_core.detector' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
