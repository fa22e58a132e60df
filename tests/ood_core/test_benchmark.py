"""The digits benchmark: a smoke run on a few detectors, every detector's configuration for the digits networks,
the outputs it routes to each detector, and the MCD shortcut it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_core import benchmark
from ood_core import detector as detectors
from ood_core.benchmark.outputs import Outputs, fit_detector
from ood_core.data import OOD_SPLITS, load_split
from ood_core.detector import MCD
from ood_core.zoo import DigitsCNN, load_classifier, load_segmenter, normalize

SUBSET = ["MaxSoftmax", "Mahalanobis", "ReAct", "MCD", "fDBD"]
SEGMENTATION_SUBSET = {"MaxSoftmax", "ReAct", "MCD"}  # Mahalanobis and fDBD do not support segmentation


@pytest.fixture(scope="module")
def classifier() -> DigitsCNN:
    return load_classifier(device="cpu")


@pytest.fixture(scope="module")
def small_outputs(classifier: DigitsCNN) -> tuple[Outputs, Outputs]:
    """Outputs of 180 train images (every class present) and of 12 test images plus 12 uniform-noise images."""
    x, y = load_split("train")
    fit = benchmark.classifier_outputs(classifier, x[:180], y[:180])
    tx, ty = load_split("test")
    noise, _ = load_split("uniform", num_far_ood=12)
    test = benchmark.classifier_outputs(classifier, torch.cat([tx[:12], noise]), torch.cat([ty[:12], -torch.ones(12)]))
    return fit, test


def test_benchmark_writes_markdown_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    served = tmp_path / "served.json"
    served.write_text(
        json.dumps(
            {
                "command": "bench/digits_served.py",
                "how": "in-process engine",
                "forward_ms_per_image": 0.5,
                "batch_size": 32,
                "device": "cpu",
                "threads": 2,
                "repeats": 3,
                "images": 256,
                "rows": [
                    {"detector": "fDBD", "input_kind": "features", "ms_per_image": 0.61, "detector_ms_per_image": 0.11},
                    {"detector": "MCD", "input_kind": "input", "ms_per_image": None, "note": "not served"},
                ],
            }
        )
    )
    args = ["--detectors", *SUBSET, "--out", str(out), "--num-far-ood", "40", "--num-mosaics", "8"]
    benchmark.main([*args, "--served", str(served)])
    report = json.loads(out.with_suffix(".json").read_text())
    markdown = out.with_suffix(".md").read_text()

    classification = report["classification"]
    assert 0.95 < classification["id_accuracy"] <= 1.0
    assert {(r["detector"], r["ood_set"]) for r in classification["rows"]} == {
        (d, s) for d in SUBSET for s in OOD_SPLITS
    }
    assert set(classification["seconds"]) == set(SUBSET)
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
    assert "## Served cost per image" in markdown
    assert "| fDBD | features | 0.610 | +0.110 |" in markdown
    assert "| MCD | input | - | - | not served |" in markdown


def test_unknown_detector_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown detectors"):
        benchmark.run(["NoSuchDetector"])


def test_every_detector_class_is_benchmarked() -> None:
    classes = {n for n in detectors.__all__ if isinstance(getattr(detectors, n), type)}
    assert set(benchmark.DETECTORS) == classes
    assert "fDBD" in benchmark.DETECTORS  # a lower-case class name is a detector too
    assert "odin_preprocessing" not in benchmark.DETECTORS


@pytest.mark.parametrize("name", benchmark.DETECTORS)
def test_every_detector_fits_and_scores_the_digits_classifier(
    name: str, classifier: DigitsCNN, small_outputs: tuple[Outputs, Outputs]
) -> None:
    """Each configuration builds, fits on the benchmark's outputs and gives one finite score per image; for
    detectors scored on precomputed outputs those scores equal the detector's own pass through the network
    (the benchmark routes each detector the output its networks produce)."""
    fit, test = small_outputs
    torch.manual_seed(0)
    det = benchmark.classifier_detector(name, classifier)
    fit_detector(det, fit)
    scores = benchmark.scores_of(det, test, batch_size=8)
    assert scores.shape == (len(test.y),)
    assert bool(torch.isfinite(scores).all())
    if det.input_kind not in ("input", "logits"):
        torch.testing.assert_close(scores, det.predict(test.x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", benchmark.DETECTORS)
def test_segmentation_configurations_give_per_pixel_scores(name: str) -> None:
    segmenter = load_segmenter(device="cpu")
    det = benchmark.segmentation_detector(name, segmenter)
    cls = getattr(detectors, name)
    if not cls.supports_segmentation:
        assert det is None
        return
    assert det is not None
    images = normalize(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        maps = segmenter.body(images)
        out = Outputs(images, torch.zeros(2, 64, 64, dtype=torch.long), segmenter(images), maps, maps, [])
    fit_detector(det, out)
    torch.manual_seed(0)
    scores = benchmark.scores_of(det, out)
    assert scores.shape == (2, 64, 64)
    assert bool(torch.isfinite(scores).all())
    if det.input_kind != "input":
        torch.testing.assert_close(scores, det.predict(images), rtol=1e-4, atol=1e-4)


def test_mcd_on_pre_dropout_maps_equals_mcd_on_images(classifier: DigitsCNN) -> None:
    images, _ = load_split("test")
    x = normalize(images[:16])
    torch.manual_seed(3)
    on_images = MCD(classifier, samples=5).predict(x)
    torch.manual_seed(3)
    with torch.no_grad():
        maps = classifier.body(x)  # eval mode: the dropout at the end of body is the identity
    on_maps = MCD(benchmark.dropout_tail(classifier.body, classifier.pool, classifier.fc), samples=5).predict(maps)
    torch.testing.assert_close(on_maps, on_images)
    assert not classifier.training  # MCD gave every module its mode back


def test_dropout_tail_requires_a_single_final_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        benchmark.dropout_tail(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_outputs_from_one_pass_match_the_networks_detectors_get(classifier: DigitsCNN) -> None:
    images, labels = load_split("test")
    out = benchmark.classifier_outputs(classifier, images[:32], labels[:32])
    x = normalize(images[:32])
    with torch.no_grad():
        torch.testing.assert_close(out.logits, classifier(x))
        for tap, layer in zip(benchmark.layer_taps(classifier), out.layers, strict=True):
            torch.testing.assert_close(layer, tap(x))
        h = x
        for stage, stage_map in zip(benchmark.stages(classifier), out.stage_maps, strict=True):
            h = stage(h)
            torch.testing.assert_close(stage_map, h)
    assert [layer.shape[1] for layer in out.layers] == [16, 32, 64]
    torch.testing.assert_close(out.maps, out.stage_maps[-1])
