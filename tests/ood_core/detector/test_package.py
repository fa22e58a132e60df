"""The lazy ``ood_core.detector`` package: every public name imports, type checkers see the same names,
and no detector module depends on being imported after another (no import cycles)."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import ood_core.detector as detectors
from ood_core.api import Detector

PACKAGE_INIT = Path(detectors.__file__)


@pytest.mark.parametrize("name", detectors.__all__)
def test_from_import_works_for_every_public_name(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from ood_core.detector import {name}", namespace)  # the statement users write
    obj = namespace[name]
    assert obj is getattr(importlib.import_module(f"ood_core.detector.{detectors._MODULES[name]}"), name)
    assert callable(obj)
    if inspect.isclass(obj):
        assert issubclass(obj, Detector)


def test_all_lists_every_lazy_name_and_unknown_names_raise() -> None:
    assert list(detectors.__all__) == list(detectors._MODULES)
    assert set(detectors.__all__) <= set(dir(detectors))
    with pytest.raises(AttributeError, match="NoSuchDetector"):
        _ = detectors.NoSuchDetector  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from ood_core.detector import NoSuchDetector", {})


def test_type_checking_imports_match_the_lazy_table() -> None:
    tree = ast.parse(PACKAGE_INIT.read_text())
    guarded = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    )
    imported = {
        alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert imported == {name: f"ood_core.detector.{module}" for name, module in detectors._MODULES.items()}


def test_each_detector_module_imports_first_in_a_fresh_interpreter() -> None:
    """Import every module as the first ood_core import of the process (a cycle would fail one of them)."""
    script = """
import importlib, sys
for module in sorted(set(sys.argv[1:])):
    for loaded in [m for m in sys.modules if m == "ood_core" or m.startswith("ood_core.")]:
        del sys.modules[loaded]
    importlib.import_module("ood_core.detector." + module)
for loaded in [m for m in sys.modules if m == "ood_core" or m.startswith("ood_core.")]:
    del sys.modules[loaded]
import ood_core.detector
assert not any(m.startswith("ood_core.detector.") for m in sys.modules), "package import is not lazy"
"""
    result = subprocess.run(
        [sys.executable, "-c", script, *detectors._MODULES.values()], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


_REQUIRED = inspect.Parameter.empty
#: constructor arguments and defaults of the issue / the pytorch-ood reference (``_REQUIRED``: no default there;
#: ``model`` may still default to None here, for the ``*_features`` methods)
SIGNATURES: dict[str, list[tuple[str, object]]] = {
    "MaxSoftmax": [("model", _REQUIRED), ("t", 1.0)],
    "MCD": [("model", _REQUIRED), ("samples", 30), ("mode", "var"), ("batch_norm", True)],
    "TemperatureScaling": [("model", _REQUIRED)],
    "KLMatching": [("model", _REQUIRED)],
    "Entropy": [("model", _REQUIRED)],
    "MaxLogit": [("model", _REQUIRED)],
    "OpenMax": [("model", _REQUIRED), ("tailsize", 25), ("alpha", 10), ("euclid_weight", 1.0)],
    "EnergyBased": [("model", _REQUIRED), ("t", 1.0)],
    "WeightedEBO": [("model", _REQUIRED), ("weights", _REQUIRED)],
    "ODIN": [("model", _REQUIRED), ("criterion", None), ("eps", 0.05), ("temperature", 1000.0), ("norm_std", None)],
    "odin_preprocessing": [
        ("model", _REQUIRED),
        ("x", _REQUIRED),
        ("y", None),
        ("criterion", None),
        ("eps", 0.05),
        ("temperature", 1000),
        ("norm_std", None),
    ],
    "GEN": [("model", _REQUIRED), ("gamma", 0.1), ("M", None)],
    "Mahalanobis": [("model", _REQUIRED), ("eps", 0.002), ("norm_std", None), ("encoder", None)],
    "MultiMahalanobis": [("model", _REQUIRED), ("alpha", None)],
    "RMD": [("model", _REQUIRED), ("encoder", None)],
    "ViM": [("model", _REQUIRED), ("d", _REQUIRED), ("w", _REQUIRED), ("b", _REQUIRED), ("encoder", None)],
    "KNN": [("model", _REQUIRED), ("k", 50), ("normalize", True), ("encoder", None), ("knn_kwargs", _REQUIRED)],
    "SHE": [("model", _REQUIRED), ("head", _REQUIRED), ("encoder", None)],
    "DICE": [
        ("model", _REQUIRED),
        ("w", _REQUIRED),
        ("b", _REQUIRED),
        ("p", _REQUIRED),
        ("detector", None),
        ("encoder", None),
    ],
    "ASH": [
        ("backbone", _REQUIRED),
        ("head", _REQUIRED),
        ("variant", "ash-s"),
        ("percentile", 0.65),
        ("detector", None),
    ],
    "ReAct": [
        ("backbone", _REQUIRED),
        ("head", _REQUIRED),
        ("threshold", 1.0),
        ("detector", None),
        ("percentile", None),
    ],
    "SCALE": [("backbone", _REQUIRED), ("head", _REQUIRED), ("percentile", 0.85), ("detector", None)],
    "fDBD": [("encoder", _REQUIRED), ("head", _REQUIRED)],
    "GMM": [("encoder", _REQUIRED), ("reg", 1e-6)],
    "LTS": [("encoder", _REQUIRED), ("head", _REQUIRED), ("p", 0.05), ("detector", None)],
    "NCI": [("encoder", _REQUIRED), ("head", _REQUIRED), ("alpha", 0.0)],
    "NNGuide": [("encoder", _REQUIRED), ("head", _REQUIRED), ("k", 10)],
    "PNML": [("encoder", _REQUIRED), ("head", _REQUIRED), ("eps", 1e-12)],
    "RankFeat": [("backbone", _REQUIRED), ("head", _REQUIRED), ("detector", None)],
    "VRA": [
        ("backbone", _REQUIRED),
        ("head", _REQUIRED),
        ("lower_percentile", 0.01),
        ("upper_percentile", 0.99),
        ("detector", None),
    ],
    "Gram": [("head", _REQUIRED), ("feature_layers", _REQUIRED), ("num_classes", _REQUIRED), ("num_poles_list", None)],
    "GradNorm": [("model", _REQUIRED), ("param_filter", None), ("micro_batch_size", 32), ("temperature", 1.0)],
    "GradUncertainty": [("model", _REQUIRED), ("param_filter", None)],
    "MahalanobisODIN": [("encoder", _REQUIRED), ("eps", 0.002), ("norm_std", None)],
    "NACUE": [
        ("model", _REQUIRED),
        ("layers", _REQUIRED),
        ("m_bins", 50),
        ("alpha", 100.0),
        ("o_star", 50),
        ("feature_reduce", None),
        ("device", None),
    ],
    "MCM": [("encoder", _REQUIRED), ("text_embeddings", _REQUIRED), ("temperature", 1.0)],
}

#: keyword-only arguments (``encoder``: pytorch-ood 0.4's name for ``model``; ReAct's ``percentile`` fit)
KEYWORD_ONLY = {("ReAct", "percentile")} | {
    (name, "encoder") for name in ("Mahalanobis", "RMD", "ViM", "KNN", "SHE", "DICE")
}
#: pytorch-ood 0.4.0 renamed ``model`` to ``encoder`` in these classes: both names work here
ENCODER_ALIAS = {name for name, arg in KEYWORD_ONLY if arg == "encoder"}
#: detectors that pytorch-ood 0.4.0 introduced with ``encoder`` as their first argument (there is no ``model``)
ENCODER_NATIVE = {"fDBD", "GMM", "LTS", "NCI", "NNGuide", "PNML", "MahalanobisODIN", "MCM"}

#: the detectors the issue lists for segmentation (B x C x H x W logits in, B x H x W scores out)
SEGMENTATION = {
    "MaxSoftmax",
    "EnergyBased",
    "Entropy",
    "MaxLogit",
    "WeightedEBO",
    "GEN",
    "TemperatureScaling",
    "MCD",
    "ODIN",
    "ASH",
    "ReAct",
    "SCALE",
    "RankFeat",
}


@pytest.mark.parametrize("name", detectors.__all__)
def test_constructor_arguments_and_defaults_match_the_reference(name: str) -> None:
    obj = getattr(detectors, name)
    parameters = list(inspect.signature(obj).parameters.values())
    assert [p.name for p in parameters] == [arg for arg, _ in SIGNATURES[name]]
    for parameter, (_, default) in zip(parameters, SIGNATURES[name], strict=True):
        if default is not _REQUIRED:
            assert parameter.default == default and type(parameter.default) is type(default), parameter.name
        if (name, parameter.name) in KEYWORD_ONLY:
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter.name
        if parameter.name == "knn_kwargs":
            assert parameter.kind is inspect.Parameter.VAR_KEYWORD
    assert ("encoder" in [p.name for p in parameters]) == (name in ENCODER_ALIAS | ENCODER_NATIVE)


def test_segmentation_is_declared_by_exactly_the_listed_detectors() -> None:
    classes = {
        name: getattr(detectors, name) for name in detectors.__all__ if inspect.isclass(getattr(detectors, name))
    }
    assert {name for name, cls in classes.items() if cls.supports_segmentation} == SEGMENTATION
