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
    from ood_core.detector.fdbd import fDBD
    from ood_core.detector.gen import GEN
    from ood_core.detector.gmm import GMM
    from ood_core.detector.gradnorm import GradNorm
    from ood_core.detector.graduncertainty import GradUncertainty
    from ood_core.detector.gram import Gram
    from ood_core.detector.klmatching import KLMatching
    from ood_core.detector.knn import KNN
    from ood_core.detector.lts import LTS
    from ood_core.detector.mahalanobis import Mahalanobis
    from ood_core.detector.mahalanobis_odin import MahalanobisODIN
    from ood_core.detector.maxlogit import MaxLogit
    from ood_core.detector.mcd import MCD
    from ood_core.detector.mcm import MCM
    from ood_core.detector.msp import MaxSoftmax
    from ood_core.detector.multi_mahalanobis import MultiMahalanobis
    from ood_core.detector.nacue import NACUE
    from ood_core.detector.nci import NCI
    from ood_core.detector.nnguide import NNGuide
    from ood_core.detector.odin import ODIN, odin_preprocessing
    from ood_core.detector.openmax import OpenMax
    from ood_core.detector.pnml import PNML
    from ood_core.detector.rankfeat import RankFeat
    from ood_core.detector.react import ReAct
    from ood_core.detector.rmd import RMD
    from ood_core.detector.scale import SCALE
    from ood_core.detector.she import SHE
    from ood_core.detector.temperature import TemperatureScaling
    from ood_core.detector.vim import ViM
    from ood_core.detector.vra import VRA
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
    "fDBD": "fdbd",
    "GMM": "gmm",
    "LTS": "lts",
    "NCI": "nci",
    "NNGuide": "nnguide",
    "PNML": "pnml",
    "RankFeat": "rankfeat",
    "VRA": "vra",
    "Gram": "gram",
    "GradNorm": "gradnorm",
    "GradUncertainty": "graduncertainty",
    "MahalanobisODIN": "mahalanobis_odin",
    "NACUE": "nacue",
    "MCM": "mcm",
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
    "fDBD",
    "GMM",
    "LTS",
    "NCI",
    "NNGuide",
    "PNML",
    "RankFeat",
    "VRA",
    "Gram",
    "GradNorm",
    "GradUncertainty",
    "MahalanobisODIN",
    "NACUE",
    "MCM",
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
