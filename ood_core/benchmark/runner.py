"""Running the digits benchmark: fit and score every detector, classification and segmentation, and the CLI."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ood_core import detector as detectors
from ood_core.api import Detector
from ood_core.benchmark.factories import classifier_detector, segmentation_detector
from ood_core.benchmark.outputs import Outputs, classifier_outputs, fit_detector, scores_of, segmenter_head
from ood_core.benchmark.report import METRICS, render_markdown
from ood_core.data import OOD_SPLITS, load_split, make_mosaics
from ood_core.metrics import OODMetrics
from ood_core.zoo import load_classifier, load_segmenter, normalize

DETECTORS: tuple[str, ...] = tuple(
    name
    for name in detectors.__all__
    if isinstance(cls := getattr(detectors, name), type) and issubclass(cls, Detector)
)
"""Every detector class of :mod:`ood_core.detector`, in its order."""
DEFAULT_OUT = Path("docs/benchmark-digits")
SEED = 0
NOTES = (
    "MCM (a vision-language detector) needs image and text embeddings of one space; the digits classifier has no "
    "text encoder, so MCM gets the classifier's own class vectors (the rows of its last linear layer) as the "
    'class "text" embeddings and the pooled features as image embeddings: a cosine-classifier stand-in, not '
    "CLIP. Its row measures the implementation, not the method's zero-shot setting.",
)


def _metrics(id_scores: Tensor, ood_scores: Tensor) -> dict[str, float]:
    labels = torch.cat([torch.zeros(len(id_scores)), -torch.ones(len(ood_scores))])
    result = OODMetrics().update(torch.cat([id_scores, ood_scores]).cpu(), labels).compute()
    return {key: result[key] for key in METRICS}


def run_classification(names: Sequence[str], device: torch.device, num_far_ood: int) -> dict[str, Any]:
    model = load_classifier(device=device)
    fit = classifier_outputs(model, *load_split("train", seed=SEED))
    test = classifier_outputs(model, *load_split("test", seed=SEED))
    accuracy = float((test.logits.argmax(1) == test.y).float().mean())
    ood_sets = {name: classifier_outputs(model, *load_split(name, SEED, num_far_ood)) for name in OOD_SPLITS}
    rows, timings, hparams = [], {}, {}
    for name in names:
        start = time.perf_counter()
        torch.manual_seed(SEED)  # MCD's dropout masks
        det = classifier_detector(name, model)
        fit_detector(det, fit)
        id_scores = scores_of(det, test)
        for ood_name, ood in ood_sets.items():
            rows.append({"detector": name, "ood_set": ood_name, **_metrics(id_scores, scores_of(det, ood))})
        timings[name] = round(time.perf_counter() - start, 2)
        hparams[name] = det.hparams()
    sizes = {"train": len(fit.y), "test": len(test.y)} | {k: len(v.y) for k, v in ood_sets.items()}
    return {"id_accuracy": accuracy, "sizes": sizes, "hparams": hparams, "rows": rows, "seconds": timings}


def run_segmentation(names: Sequence[str], device: torch.device, num_mosaics: int) -> dict[str, Any]:
    model = load_segmenter(device=device)
    fit_images, fit_pixel_labels = make_mosaics(num_mosaics // 2, ood_share=0.0, seed=SEED, split="train")
    images, labels = make_mosaics(num_mosaics, ood_share=0.5, seed=SEED, split="test")
    x_fit, x = normalize(fit_images.to(device)), normalize(images.to(device))
    with torch.no_grad():
        maps_fit, maps = model.body(x_fit), model.body(x)
        logits_fit, logits = segmenter_head(model)(maps_fit), segmenter_head(model)(maps)
    fit = Outputs(x_fit, fit_pixel_labels.to(device), logits_fit, maps_fit, maps_fit, [])
    test = Outputs(x, labels.to(device), logits, maps, maps, [])
    id_pixels = test.y >= 0
    accuracy = float(((logits.argmax(1) == test.y) & id_pixels).sum() / id_pixels.sum())
    rows = []
    for name in names:
        torch.manual_seed(SEED)
        det = segmentation_detector(name, model)
        if det is None:
            continue
        fit_detector(det, fit)
        scores = scores_of(det, test, batch_size=64).cpu()
        for mode in ("segmentation", "segmentation-per-image"):
            result = OODMetrics(mode=mode).update(scores, labels).compute()
            rows.append({"detector": name, "mode": mode, **{key: result[key] for key in METRICS}})
    return {"id_pixel_accuracy": accuracy, "mosaics": num_mosaics, "rows": rows}


def run(
    names: Sequence[str] = DETECTORS,
    device: str | torch.device | None = None,
    num_far_ood: int = 500,
    num_mosaics: int = 200,
) -> dict[str, Any]:
    """Run the benchmark and return the report (what the JSON file holds)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = sorted(set(names) - set(DETECTORS))
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {DETECTORS}")
    return {
        "command": "python -m ood_core.benchmark",
        "seed": SEED,
        "torch": torch.__version__.split("+")[0],
        "classification": run_classification(names, dev, num_far_ood),
        "segmentation": run_segmentation(names, dev, num_mosaics),
        "notes": [note for note in NOTES if note.split(" ", 1)[0] in names],
    }


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write ``out.md`` and ``out.json``; returns the Markdown."""
    markdown = render_markdown(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OOD benchmark on the embedded digits data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without suffix (.md and .json)")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), help="subset of detectors")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--num-far-ood", type=int, default=500, help="images per synthetic far-OOD set")
    parser.add_argument("--num-mosaics", type=int, default=200, help="test mosaics for segmentation")
    parser.add_argument(
        "--served", type=Path, default=None, help="JSON of bench/digits_served.py: adds the served cost per image"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = run(args.detectors, args.device, args.num_far_ood, args.num_mosaics)
    if args.served is not None:
        report["served"] = json.loads(args.served.read_text())
    print(write_report(report, args.out))
    print(f"total {time.perf_counter() - start:.1f} s; wrote {args.out.with_suffix('.md')} and .json")
