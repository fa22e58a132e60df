"""OOD detectors, one module each, with pytorch-ood's class names and constructor arguments.

The detector modules are imported lazily, on first access of a name (PEP 562 ``__getattr__``), so that
``import ood_core.detector`` stays cheap (OpenMax pulls in scipy, for example) and ``from
ood_core.detector import X`` loads only the module of ``X``. For type checkers and IDEs the same names
are imported statically under ``TYPE_CHECKING``; keep that block and :data:`_MODULES` in step (a test
checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ood_core.detector.ash import ASH
    from ood_core.detector.dice import DICE
    from ood_core.detector.energy import EnergyBased
    from ood_core.detector.entropy import Entropy
    from ood_core.detector.gen import GEN
    from ood_core.detector.klmatching import KLMatching
    from ood_core.detector.knn import KNN
    from ood_core.detector.mahalanobis import Mahalanobis
    from ood_core.detector.maxlogit import MaxLogit
    from ood_core.detector.mcd import MCD
    from ood_core.detector.msp import MaxSoftmax
    from ood_core.detector.multi_mahalanobis import MultiMahalanobis
    from ood_core.detector.odin import ODIN, odin_preprocessing
    from ood_core.detector.openmax import OpenMax
    from ood_core.detector.react import ReAct
    from ood_core.detector.rmd import RMD
    from ood_core.detector.scale import SCALE
    from ood_core.detector.she import SHE
    from ood_core.detector.temperature import TemperatureScaling
    from ood_core.detector.vim import ViM
    from ood_core.detector.weighted_energy import WeightedEBO

#: public name -> module of this package that defines it
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

#: public names, in the order of :data:`_MODULES` (the benchmark lists detectors in this order)
__all__ = [
    "MaxSoftmax",
    "MCD",
    "TemperatureScaling",
    "KLMatching",
    "Entropy",
    "MaxLogit",
    "OpenMax",
    "EnergyBased",
    "WeightedEBO",
    "ODIN",
    "odin_preprocessing",
    "GEN",
    "Mahalanobis",
    "MultiMahalanobis",
    "RMD",
    "ViM",
    "KNN",
    "SHE",
    "DICE",
    "ASH",
    "ReAct",
    "SCALE",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups bypass __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
