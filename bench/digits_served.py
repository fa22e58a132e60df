"""Served cost per image of every detector on the digits classifier, through the service's engine, in-process.

Every detector is configured and fitted as the digits benchmark does (:mod:`ood_core.benchmark`: same
hyperparameters, fitted with ood_core on the digits ``train`` split and calibrated on ``calibration``), saved
with ``save_detector`` and loaded the way an upload is (``service.states.validate.build_detector``: validated
against the served model, wired to its networks, smoke-tested). It then scores batches of the ``test`` split
through :func:`service.engine.scoring.process_batch`, the function the batch worker runs: staging, preprocessing,
one forward of the served extractor, the detector (network-in-the-loop detectors on the batch's preprocessed
inputs, several-layer detectors on the ``nodes.layers`` outputs of the same forward), verdicts with p-values.
No HTTP and no queue: the cost a batch adds to the worker. The served model is the demo's ``digits`` config with
``nodes.layers: [body.2, body.7, body]`` (the three conv stages) added for Gram, MultiMahalanobis and NACUE.

Per detector, ``--repeats`` rounds, each one run of all batches with no detector selected (the forward only)
and one with the detector: "ms / image" is the median of the latter over the rounds, divided by the number of
images, "detector ms / image" the median of the paired differences (the machine may be shared: a pair sees the
same load). The forward-only figure is the median of all rounds' forward-only runs.

Usage: ``.venv/bin/python bench/digits_served.py [--update-docs]``; JSON goes to
``bench/results/digits-served-<time>.json``; ``--update-docs`` adds it to ``docs/benchmark-digits.{json,md}``
(re-rendered by :func:`ood_core.benchmark.render_markdown`, without rerunning the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ood_core import benchmark  # noqa: E402
from ood_core import detector as detectors  # noqa: E402
from ood_core.benchmark.outputs import fit_detector  # noqa: E402
from ood_core.calibration import Calibration  # noqa: E402
from ood_core.data import load_split  # noqa: E402
from ood_core.state import save_detector  # noqa: E402
from ood_core.zoo import DigitsCNN, load_classifier  # noqa: E402
from service.demo import demo_model_configs  # noqa: E402
from service.engine.active import ActiveDetector, StoredState  # noqa: E402
from service.engine.items import ScoreItem  # noqa: E402
from service.engine.scoring import process_batch  # noqa: E402
from service.engine.served_model import ServedModel  # noqa: E402
from service.errors import UnservableDetectorError  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.states.validate import build_detector  # noqa: E402

LAYERS = ["body.2", "body.7", "body"]
DOCS = ROOT / "docs" / "benchmark-digits"


def served_model(device: str | None, batch_size: int) -> ServedModel:
    config = demo_model_configs()[0]
    config = config.model_copy(update={"nodes": config.nodes.model_copy(update={"layers": LAYERS})})
    return ServedModel(config, Settings(device=device, max_batch_size=batch_size))


def uploaded(model: ServedModel, name: str, zoo: DigitsCNN, fit: Any, calibration: Any) -> ActiveDetector:
    """The benchmark's ``name``, fitted and calibrated with ood_core, saved and loaded as an upload."""
    torch.manual_seed(benchmark.SEED)
    det = benchmark.classifier_detector(name, zoo)
    fit_detector(det, fit)
    cal = Calibration.from_scores(benchmark.scores_of(det, calibration).float().cpu())
    data = save_detector(det, calibration=cal)
    loaded = build_detector(model, data)
    loaded.calibration = cal
    stored = StoredState(model.name, name.lower(), 1, "-", len(data), name, "-")
    return ActiveDetector(name.lower(), loaded, stored)


def time_batches(model: ServedModel, batches: list[list[Tensor]], active: tuple[ActiveDetector, ...]) -> float:
    start = time.perf_counter()
    for pixels in batches:
        process_batch(model, [ScoreItem(p, active) for p in pixels])
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = served_model(args.device, args.batch_size)
    zoo = load_classifier(device=model.device)
    fit = benchmark.classifier_outputs(zoo, *load_split("train", seed=benchmark.SEED))
    calibration = benchmark.classifier_outputs(zoo, *load_split("calibration", seed=benchmark.SEED))
    images, _ = load_split("test", seed=benchmark.SEED)
    pixels = model.preprocessor.pixels_from_tensor(images[: args.images])
    batches = [pixels[i : i + args.batch_size] for i in range(0, len(pixels), args.batch_size)]

    def per_image(active: tuple[ActiveDetector, ...]) -> float:
        return 1000.0 * time_batches(model, batches, active) / len(pixels)

    time_batches(model, batches, ())  # warm-up
    forward: list[float] = []
    rows = []
    for name in args.detectors:
        row: dict[str, Any] = {"detector": name, "input_kind": getattr(detectors, name).input_kind}
        try:
            active = (uploaded(model, name, zoo, fit, calibration),)
        except UnservableDetectorError as exc:
            rows.append(row | {"ms_per_image": None, "note": f"refused (422): {exc}"})
            print(f"{name:18s} not served", flush=True)
            continue
        time_batches(model, batches[:1], active)  # warm-up
        pairs = [(per_image(()), per_image(active)) for _ in range(args.repeats)]  # interleaved: same load
        forward += [base for base, _ in pairs]
        row["ms_per_image"] = statistics.median(with_detector for _, with_detector in pairs)
        row["detector_ms_per_image"] = statistics.median(with_detector - base for base, with_detector in pairs)
        rows.append(row)
        print(f"{name:18s} {row['ms_per_image']:.3f} ms / image ({row['detector_ms_per_image']:+.3f})", flush=True)
    base = statistics.median(forward)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return {
        "command": "bench/digits_served.py",
        "how": "each detector's state (fitted as in the benchmark) loaded like an upload and scored in-process "
        "through the service engine's batch function (`service.engine.scoring.process_batch`: stage, preprocess, "
        "one forward, the detector, verdicts); no HTTP, no queue.",
        "forward_ms_per_image": base,
        "batch_size": args.batch_size,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "images": len(pixels),
        "load_average_end": load,
        "torch": torch.__version__.split("+")[0],
        "rows": rows,
        "notes": [
            f"Shared machine, 1-minute load average {load.split(',')[0]} at the end: take the absolute times as "
            "rough; paired differences of a few hundredths of a millisecond (some slightly negative) are noise. "
            "Network-in-the-loop detectors (kind `input`) run the served network again per batch, with gradients "
            "(ODIN, MahalanobisODIN, GradNorm, GradUncertainty, NACUE) or 30 dropout samples (MCD).",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--detectors", nargs="+", default=list(benchmark.DETECTORS))
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (the service's default)")
    parser.add_argument("--images", type=int, default=256, help="test images scored per run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs with and without the detector")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)")
    parser.add_argument("--update-docs", action="store_true", help=f"add the result to {DOCS}.{{json,md}}")
    args = parser.parse_args()
    served = measure(args)
    out = ROOT / "bench" / "results" / f"digits-served-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(served, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    if args.update_docs:
        report = json.loads(DOCS.with_suffix(".json").read_text())
        report["served"] = served
        benchmark.write_report(report, DOCS)
        print(f"updated {DOCS.with_suffix('.md').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
