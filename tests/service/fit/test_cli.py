"""``ood-fit`` over a class-folder tree of the digits data (classes 0-5, ``ood/`` = digits 6-9): for every detector
that needs fitting and can be served on the demo classifier, the state equals the library's ``fit_features`` on
the same preprocessed images with the same hold-out, the AUROC is ``OODMetrics``' on the held-out ID vs OOD
scores, the report has the documented keys and the state passes the upload checks; every container gives the
directory's state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ood_core.detector as detectors
from ood_core.api import Detector
from ood_core.calibration import Calibration
from ood_core.metrics import OODMetrics
from ood_core.state import save_detector
from service.engine.served_model import ServedModel
from service.fit.detectors import new_detector
from service.fit.holdout import calibration_mask, key_hashes
from service.states.validate import SERVABLE_KINDS, build_detector
from tests.service.fit.conftest import DigitsTree, assert_same_state

pytestmark = pytest.mark.timeout(300)

HPARAMS: dict[str, dict[str, Any]] = {
    "KNN": {"k": 5},
    "NNGuide": {"k": 5},
    "OpenMax": {"tailsize": 8},
    "ViM": {"d": 16},
    "DICE": {"p": 0.5},
    "ReAct": {"threshold": None, "percentile": 0.9},
}
"""Hyperparameters for the small data set (or that a constructor requires); every other class uses its defaults."""


def fitted_classes() -> list[str]:
    """Every detector class of the library that needs fitting (with HPARAMS) on a servable input kind."""
    names = []
    for name in detectors.__all__:
        cls = getattr(detectors, name)
        if isinstance(cls, type) and issubclass(cls, Detector) and cls.input_kind in SERVABLE_KINDS:
            needs_fit = cls.requires_fit and (name != "ReAct" or "percentile" in HPARAMS["ReAct"])
            if needs_fit:
                names.append(name)
    return names


@pytest.fixture(scope="module")
def outputs(digits_model: ServedModel, digits_tree: DigitsTree) -> dict[str, torch.Tensor]:
    """The served outputs of the preprocessed images (computed from the in-memory digits, not read from files)."""
    return digits_model.forward_chunks(digits_tree.pixels)


def reference(
    model: ServedModel, tree: DigitsTree, outputs: dict[str, torch.Tensor], name: str, share: float = 0.1, seed: int = 0
) -> tuple[bytes, dict[str, float]]:
    """The library's own fit: ``fit_features`` on the outputs of the preprocessed images, calibrated on the
    held-out ID images, and OODMetrics on held-out ID vs OOD."""
    held = calibration_mask(key_hashes(tree.keys, seed), tree.labels, share)
    fit = (tree.labels >= 0) & ~held
    detector, kind = new_detector(model, name, HPARAMS.get(name, {}))
    detector.fit_features(outputs[kind][fit], tree.labels[fit])
    with torch.no_grad():
        scores = detector.predict_features(outputs[kind]).float()
    evaluated = held | (tree.labels < 0)
    metrics = OODMetrics().update(scores[evaluated].double(), tree.labels[evaluated]).compute()
    return save_detector(detector, calibration=Calibration.from_scores(scores[held])), metrics


def test_fitted_classes_cover_the_known_ones() -> None:
    known = {"Mahalanobis", "KNN", "RMD", "ViM", "SHE", "DICE", "ReAct", "OpenMax", "KLMatching", "TemperatureScaling"}
    assert known <= set(fitted_classes())


@pytest.mark.parametrize("name", fitted_classes())
def test_directory_fit_equals_the_library_fit(
    name: str,
    digits_model: ServedModel,
    digits_tree: DigitsTree,
    outputs: dict[str, torch.Tensor],
    directory_states: dict[str, tuple[bytes, dict[str, float]]],
    ood_fit: Any,
    tmp_path: Path,
) -> None:
    out, report = tmp_path / "state.safetensors", tmp_path / "report.json"
    hparams = json.dumps(HPARAMS.get(name, {}))
    status, stdout, stderr = ood_fit(
        "--detector", name, "--hparams", hparams, "--data", str(digits_tree.root), "--workers", "0",
        "--batch-size", "50", "--out", str(out), "--json", str(report),
    )  # fmt: skip
    assert status == 0, stderr
    want, metrics = reference(digits_model, digits_tree, outputs, name)
    assert_same_state(out.read_bytes(), want, rtol=1e-3, atol=1e-4)
    body = json.loads(report.read_text())
    assert {"images", "skipped", "calibration_size", "threshold", "metrics"} <= set(body)
    n_id = int((digits_tree.labels >= 0).sum())
    assert body["images"] == len(digits_tree.keys) and body["skipped"] == 0
    assert body["calibration_size"] == round(0.1 * n_id)
    assert body["metrics"]["AUROC"] == pytest.approx(metrics["AUROC"], abs=1e-6)
    assert set(body["metrics"]) == {"AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"}
    assert f"AUROC {metrics['AUROC']:.4f}" in stdout and "state written to" in stdout
    build_detector(digits_model, out.read_bytes())  # what an upload runs: class, dims, values, a smoke test
    directory_states[name] = (out.read_bytes(), body["metrics"])


@pytest.mark.parametrize("container", ["zip", "tar.gz", "wds", "outputs"])
@pytest.mark.parametrize("name", ["Mahalanobis", "KNN", "ViM"])
def test_every_container_gives_the_directory_state(
    container: str,
    name: str,
    containers: dict[str, str],
    directory_states: dict[str, tuple[bytes, dict[str, float]]],
    ood_fit: Any,
    tmp_path: Path,
) -> None:
    """The directory's state is the test above's (0 workers) when it ran; the containers are read with 2."""
    states = {}
    for kind in ("dir", container) if name not in directory_states else (container,):
        out = tmp_path / f"{kind}.safetensors"
        status, _, stderr = ood_fit(
            "--detector", name, "--hparams", json.dumps(HPARAMS.get(name, {})), "--data", containers[kind],
            "--workers", "2", "--out", str(out),
        )  # fmt: skip
        assert status == 0, stderr
        states[kind] = out.read_bytes()
    assert_same_state(
        states[container],
        directory_states[name][0] if name in directory_states else states["dir"],
        rtol=1e-3,
        atol=1e-4,
    )


def test_config_file_model_and_named_class_folders(digits_tree: DigitsTree, ood_fit: Any, tmp_path: Path) -> None:
    from ood_core.zoo import DIGITS_MEAN, DIGITS_STD
    from tests.service.fit.conftest import write_zip

    names = ["zero", "one", "two", "three", "four", "five"]
    config = tmp_path / "models.yaml"
    config.write_text(
        "models:\n"
        "  - {name: mydigits, source: zoo, architecture: digits-classifier, num_classes: 6, input_size: 32,\n"
        f"     labels: [{', '.join(names)}], nodes: {{logits: fc, features: pool, feature_maps: body}},\n"
        f"     preprocessing: {{mode: L, mean: [{DIGITS_MEAN}], std: [{DIGITS_STD}]}}}}\n"
    )
    renamed = {}  # the first 20 images of each folder, class folders named like the labels
    for name, png in digits_tree.pngs.items():
        folder, file = name.split("/")
        if int(file[1:4]) < 20:
            renamed[f"{names[int(folder)] if folder.isdigit() else folder}/{file}"] = png
    data = write_zip(tmp_path / "named.zip", renamed)
    out, report = tmp_path / "state.safetensors", tmp_path / "report.json"
    args = ("--detector", "KNN", "--data", str(data), "--workers", "0", "--out", str(out), "--json", str(report))
    status, stdout, stderr = ood_fit("--config", str(config), *args)
    assert status == 0, stderr
    assert json.loads(report.read_text())["model"] == "mydigits" and "KNN on mydigits" in stdout
    assert json.loads(report.read_text())["images"] == len(renamed)
    status, _, stderr = ood_fit("--config", str(config), "--model", "digits", *args)
    assert status == 1 and "no model 'digits'" in stderr and "mydigits" in stderr
    config.write_text("models: [{name: x}]\n")
    status, _, stderr = ood_fit("--config", str(config), *args)
    assert status == 1 and "invalid configuration" in stderr and len(stderr.strip().splitlines()) == 1
