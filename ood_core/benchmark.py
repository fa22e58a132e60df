"""The embedded digits benchmark: ``python -m ood_core.benchmark`` (or ``ood-bench``).

Fits every detector of :mod:`ood_core.detector` on the ID ``train`` split of :mod:`ood_core.data` (digits 0-5),
using the zoo's classifier (:func:`ood_core.zoo.load_classifier`), and measures AUROC, AUPR-IN, AUPR-OUT and
FPR95TPR (:mod:`ood_core.metrics`; OOD is the positive class) of the ID ``test`` split against each OOD set:
near-OOD digits 6-9, Gaussian noise, uniform noise and crops of scikit-learn's sample photos. The detectors
that support segmentation are measured per pixel on 64x64 mosaics (:func:`ood_core.data.make_mosaics`) with
the zoo's segmenter, pooled over all pixels and averaged per image (mosaics with an OOD digit).

Network outputs (logits, pooled features, feature maps, per-layer features) are computed once per data set;
detectors consume them through ``fit_features`` / ``predict_features``. Only the detectors whose
``input_kind`` is ``"input"`` run the network themselves, through ``predict``: ODIN on the images (it needs
input gradients); MCD on the feature maps before the networks' only dropout layer (the last layer of ``body``),
with the dropout and everything after it as its model: the layers before the dropout are deterministic (no
batch norm), so this samples exactly the same distribution as passing the images, at a fraction of the cost.
Hyperparameters are pytorch-ood's defaults except where the small data need others (``classifier_detector``).
Writes Markdown and JSON (default ``docs/benchmark-digits.{md,json}``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ood_core import detector as detectors
from ood_core.api import Detector
from ood_core.data import OOD_SPLITS, load_split, make_mosaics
from ood_core.metrics import OODMetrics
from ood_core.zoo import DIGITS_STD, DigitsCNN, DigitsSegmenter, load_classifier, load_segmenter, normalize

METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR")
DETECTORS: tuple[str, ...] = tuple(name for name in detectors.__all__ if name[0].isupper())
DEFAULT_OUT = Path("docs/benchmark-digits")
SEED = 0


@dataclass
class Outputs:
    """One data set through the classifier: normalized inputs, labels and every network output."""

    x: Tensor
    y: Tensor
    logits: Tensor
    features: Tensor
    maps: Tensor
    layers: list[Tensor]

    def for_detector(self, kind: str) -> Any:
        """What ``predict_features`` / ``fit_features`` of a detector with ``input_kind`` ``kind`` take."""
        return {"logits": self.logits, "features": self.features, "feature_maps": self.maps}.get(kind, self.layers)


STAGE_ENDS = (3, 8, None)
"""``body[:3]``, ``body[:8]``, ``body``: after the first and second max-pooling and the last conv (+ dropout)."""


def layer_taps(model: DigitsCNN) -> list[nn.Module]:
    """Globally pooled activations after each stage of the body (16, 32, 64 channels): MultiMahalanobis' layers."""
    return [nn.Sequential(model.body[:end], model.pool) for end in STAGE_ENDS]


@torch.no_grad()
def classifier_outputs(model: DigitsCNN, images: Tensor, labels: Tensor) -> Outputs:
    """Every output the detectors need, from one pass (the stages of :func:`layer_taps` run in sequence)."""
    h = x = normalize(images.to(next(model.parameters()).device))
    layers, start = [], 0
    for end in STAGE_ENDS:
        h = model.body[start:end](h)
        layers.append(model.pool(h))
        start = end or 0
    maps, features = h, layers[-1]
    return Outputs(x, labels.to(x.device), model.fc(features), features, maps, layers)


def segmenter_head(segmenter: DigitsSegmenter) -> Callable[[Tensor], Tensor]:
    """Feature maps -> full-resolution logits (the part of the segmenter after ``body``)."""
    return nn.Sequential(segmenter.head, segmenter.upsample)


def classifier_detector(name: str, model: DigitsCNN) -> Detector:
    """``name`` configured for the digits classifier: pytorch-ood's defaults, except (chosen before looking at
    results) ViM ``d=32`` (no default; features are 64-d), KNN ``k=10`` (default 50 is for 50,000 training
    samples; here 649), DICE ``p=0.7`` (no default; the paper's ImageNet value), Mahalanobis ``eps=0`` (scores
    features, no input preprocessing), WeightedEBO with unit weights (there are no VOS-trained weights, so it
    equals EnergyBased), ODIN with ``norm_std=[DIGITS_STD]`` (eps in pixel units), MultiMahalanobis on the
    pooled outputs of the three conv stages (:func:`layer_taps`)."""
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    taps = layer_taps(model)
    features_net = nn.Sequential(model.body, model.pool)
    factories: dict[str, Callable[[], Detector]] = {
        "MCD": lambda: detectors.MCD(dropout_tail(model.body, model.pool, model.fc)),
        "ODIN": lambda: detectors.ODIN(model, norm_std=[DIGITS_STD]),
        "Mahalanobis": lambda: detectors.Mahalanobis(features_net, eps=0.0),
        "MultiMahalanobis": lambda: detectors.MultiMahalanobis(taps),
        "ViM": lambda: detectors.ViM(features_net, d=32, w=w, b=b),
        "KNN": lambda: detectors.KNN(features_net, k=10),
        "SHE": lambda: detectors.SHE(features_net, model.fc),
        "DICE": lambda: detectors.DICE(features_net, w=w, b=b, p=0.7),
        "WeightedEBO": lambda: detectors.WeightedEBO(model, torch.ones(1, model.num_classes, device=w.device)),
        "ASH": lambda: detectors.ASH(model.body, model.head_from_maps),
        "ReAct": lambda: detectors.ReAct(model.body, model.head_from_maps),
        "SCALE": lambda: detectors.SCALE(model.body, model.head_from_maps),
    }
    factory = factories.get(name, lambda: getattr(detectors, name)(model))
    return factory()


def segmentation_detector(name: str, model: DigitsSegmenter) -> Detector | None:
    """``name`` configured for the segmenter, or ``None`` if the detector does not support segmentation."""
    cls = getattr(detectors, name)
    if not cls.supports_segmentation:
        return None
    head = segmenter_head(model)
    if cls.input_kind == "feature_maps":
        return cls(model.body, head)  # type: ignore[no-any-return]
    if name == "MCD":
        return detectors.MCD(dropout_tail(model.body, model.head, model.upsample))
    if name == "ODIN":
        return detectors.ODIN(model, norm_std=[DIGITS_STD])
    if name == "WeightedEBO":
        return detectors.WeightedEBO(model, torch.ones(1, model.num_classes, device=model.head.weight.device))
    return cls(model)  # type: ignore[no-any-return]


def dropout_tail(body: nn.Sequential, *rest: nn.Module) -> nn.Sequential:
    """The network from its dropout layer on (``body[-1]``, then ``rest``): MCD's model on feature maps."""
    if not isinstance(body[-1], nn.Dropout2d) or any(isinstance(m, nn.Dropout2d) for m in body[:-1].modules()):
        raise ValueError("expected exactly one dropout layer, at the end of body")
    return nn.Sequential(body[-1], *rest)


def scores_of(det: Detector, out: Outputs, batch_size: int = 256) -> Tensor:
    """Outlier scores of one data set: from the precomputed outputs, or through ``predict`` for "input" kinds
    (MCD on the pre-dropout maps, see the module docstring)."""
    if det.input_kind != "input":
        with torch.no_grad():
            return det.predict_features(out.for_detector(det.input_kind))
    inputs = out.maps if isinstance(det, detectors.MCD) else out.x
    return torch.cat([det.predict(x) for x in inputs.split(batch_size)])


def fit_labels(det: Detector, out: Outputs) -> Tensor:
    """Labels for ``fit_features``: per pixel for logits, per image (all ID) for segmentation feature maps."""
    if out.y.dim() > 1 and det.input_kind == "feature_maps":
        return torch.zeros(len(out.y), dtype=torch.long, device=out.y.device)
    return out.y


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
        if det.requires_fit:
            det.fit_features(fit.for_detector(det.input_kind), fit.y)
        id_scores = scores_of(det, test)
        for ood_name, ood in ood_sets.items():
            rows.append({"detector": name, "ood_set": ood_name, **_metrics(id_scores, scores_of(det, ood))})
        timings[name] = time.perf_counter() - start
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
        if det.requires_fit:
            det.fit_features(fit.for_detector(det.input_kind), fit_labels(det, fit))
        scores = scores_of(det, test, batch_size=64).cpu()
        for mode in ("segmentation", "segmentation-per-image"):
            result = OODMetrics(mode=mode).update(scores, labels).compute()
            rows.append({"detector": name, "mode": mode, **{key: result[key] for key in METRICS}})
    return {"id_pixel_accuracy": accuracy, "mosaics": num_mosaics, "rows": rows}


def _table(header: Sequence[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: an AUROC overview, one table per OOD set and the segmentation table."""
    cls, seg = report["classification"], report["segmentation"]
    by_set: dict[str, list[dict[str, Any]]] = {}
    for row in cls["rows"]:
        by_set.setdefault(row["ood_set"], []).append(row)
    lines = [
        "# OOD detection on the embedded digits benchmark",
        "",
        f"Generated by `{report['command']}` (seed {report['seed']}, torch {report['torch']}). All values in %;",
        "OOD is the positive class; higher is better except FPR95TPR (share of ID flagged at 95% OOD recall).",
        "",
        f"Classifier (`ood_core.zoo.load_classifier`) ID test accuracy: **{_pct(cls['id_accuracy'])}%**. "
        "Split sizes: " + ", ".join(f"{k} {v}" for k, v in cls["sizes"].items()) + ".",
        "",
        "## AUROC per detector and OOD set",
        "",
    ]
    sets = list(by_set)
    auroc = {(r["detector"], r["ood_set"]): r["AUROC"] for r in cls["rows"]}
    names = list(dict.fromkeys(r["detector"] for r in cls["rows"]))
    overview = [
        [n] + [_pct(auroc[n, s]) for s in sets] + [_pct(sum(auroc[n, s] for s in sets) / len(sets))] for n in names
    ]
    lines += _table(["Detector", *sets, "mean"], overview)
    best = {s: max((auroc[n, s], n) for n in names)[1] for s in sets}
    lines += ["", "Best AUROC: " + "; ".join(f"`{s}` {n} ({_pct(auroc[n, s])})" for s, n in best.items()) + "."]
    for ood_set, rows in by_set.items():
        lines += ["", f"## ID test vs `{ood_set}`", ""]
        lines += _table(["Detector", *METRICS], [[r["detector"]] + [_pct(r[m]) for m in METRICS] for r in rows])
    lines += [
        "",
        "## Segmentation: pixel-level, 64x64 mosaics (one near-OOD digit in half of them)",
        "",
        f"Segmenter (`ood_core.zoo.load_segmenter`) ID pixel accuracy: **{_pct(seg['id_pixel_accuracy'])}%** "
        f"on {seg['mosaics']} test mosaics. `segmentation` pools all pixels; `segmentation-per-image` averages "
        "over the mosaics that contain an OOD digit. Detectors that need fitting are fitted on "
        f"{seg['mosaics'] // 2} ID-only mosaics of `train` digits.",
        "",
    ]
    lines += _table(
        ["Detector", "Mode", *METRICS],
        [[r["detector"], r["mode"]] + [_pct(r[m]) for m in METRICS] for r in seg["rows"]],
        text_columns=2,
    )
    return "\n".join(lines) + "\n"


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
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OOD benchmark on the embedded digits data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without suffix (.md and .json)")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), help="subset of detectors")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--num-far-ood", type=int, default=500, help="images per synthetic far-OOD set")
    parser.add_argument("--num-mosaics", type=int, default=200, help="test mosaics for segmentation")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = run(args.detectors, args.device, args.num_far_ood, args.num_mosaics)
    seconds = report["classification"].pop("seconds")
    markdown = render_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print("seconds per detector (fit + score):", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"total {time.perf_counter() - start:.1f} s; wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
