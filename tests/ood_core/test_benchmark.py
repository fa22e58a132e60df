"""Smoke test of the digits benchmark on a few detectors, and the MCD shortcut it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core import benchmark
from ood_core.data import OOD_SPLITS, load_split
from ood_core.detector import MCD
from ood_core.zoo import load_classifier, normalize

SUBSET = ["MaxSoftmax", "Mahalanobis", "ReAct", "MCD"]
SEGMENTATION_SUBSET = {"MaxSoftmax", "ReAct", "MCD"}  # Mahalanobis does not support segmentation


def test_benchmark_writes_markdown_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    benchmark.main(["--detectors", *SUBSET, "--out", str(out), "--num-far-ood", "40", "--num-mosaics", "8"])
    report = json.loads(out.with_suffix(".json").read_text())
    markdown = out.with_suffix(".md").read_text()

    classification = report["classification"]
    assert 0.95 < classification["id_accuracy"] <= 1.0
    assert {(r["detector"], r["ood_set"]) for r in classification["rows"]} == {
        (d, s) for d in SUBSET for s in OOD_SPLITS
    }
    segmentation = report["segmentation"]
    assert {r["detector"] for r in segmentation["rows"]} == SEGMENTATION_SUBSET
    assert {r["mode"] for r in segmentation["rows"]} == {"segmentation", "segmentation-per-image"}
    for row in classification["rows"] + segmentation["rows"]:
        for metric in benchmark.METRICS:
            assert 0.0 <= row[metric] <= 1.0, (row, metric)
    near_ood = {r["detector"]: r["AUROC"] for r in classification["rows"] if r["ood_set"] == "near_ood"}
    assert max(near_ood.values()) > 0.85  # the trained classifier separates digits 0-5 from 6-9

    assert markdown.startswith("# OOD detection on the embedded digits benchmark")
    for name in SUBSET:
        assert f"| {name} |" in markdown
    assert f"{100 * near_ood['Mahalanobis']:.2f}" in markdown


def test_unknown_detector_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown detectors"):
        benchmark.run(["NoSuchDetector"])


def test_mcd_on_pre_dropout_maps_equals_mcd_on_images() -> None:
    model = load_classifier(device="cpu")
    images, _ = load_split("test")
    x = normalize(images[:16])
    torch.manual_seed(3)
    on_images = MCD(model, samples=5).predict(x)
    torch.manual_seed(3)
    with torch.no_grad():
        maps = model.body(x)  # eval mode: the dropout at the end of body is the identity
    on_maps = MCD(benchmark.dropout_tail(model.body, model.pool, model.fc), samples=5).predict(maps)
    torch.testing.assert_close(on_maps, on_images)
    assert not model.training  # MCD gave every module its mode back


def test_dropout_tail_requires_a_single_final_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        benchmark.dropout_tail(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_outputs_from_one_pass_match_the_networks_detectors_get() -> None:
    model = load_classifier(device="cpu")
    images, labels = load_split("test")
    out = benchmark.classifier_outputs(model, images[:32], labels[:32])
    x = normalize(images[:32])
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x))
        for tap, layer in zip(benchmark.layer_taps(model), out.layers, strict=True):
            torch.testing.assert_close(layer, tap(x))
    assert [layer.shape[1] for layer in out.layers] == [16, 32, 64]
