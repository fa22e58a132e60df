"""Benchmark of streaming fits (issue 9): memory, throughput and torchrun scaling of ``service.fit``.

``offline`` mode (the default): for each size (default 5,000 and 50,000) a zip of generated 32x32 digit images is
written (90% classes 0-5 from the digits ``train`` split, 10% ``ood/`` digits 6-9, each shifted by up to 2 pixels
and with N(0, 0.02) noise, so every image is distinct), then for each detector (default Mahalanobis and KNN), number
of ranks (default 1 and 2) and number of decoding workers per rank (default 0 and ``min(4, CPUs)``) one fit runs in
a fresh process (``torchrun --nproc-per-node R`` for R > 1) through :func:`service.fit.runner.run_fit`, reporting:

* ``peak_rss_mb``: peak resident memory of the fitting process (rank 0; ``getrusage`` ``ru_maxrss``), and of its
  decoding workers (``RUSAGE_CHILDREN``); the Gaussian fit (Mahalanobis) must grow by < 100 MB from the smallest to
  the largest size, since its statistics do not grow with the data (KNN's feature bank does, by design);
* ``fit_images_per_s``: images read (fit passes + calibration + OOD) / wall time of ``run_fit`` (scan, hold-out,
  passes, merge, calibration), all ranks together;
* ``baseline_images_per_s``: the served model's own decode + preprocess + forward throughput over the same zip at
  the same batch size, in one process with no workers (``forward`` mode), and ``ratio`` = fit / baseline
  (target >= 0.9 for one rank, with its better worker count).

``server`` mode (``bench/fit_server.py``): a fit job over generated images on a running server, its memory and the
scoring latency beside it. Writes JSON to
``bench/results/fit-offline-<timestamp>.json`` and prints a Markdown table. Method: ``docs/benchmark-fit.md``::

    python bench/fit.py offline                                  # the full run (minutes)
    python bench/fit.py offline --quick                          # 400 and 2,000 images, 0 workers (a smoke run)
    python bench/fit.py offline --sizes 5000 --detectors KNN --ranks 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def make_zip(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` distinct generated digits as 8-bit PNGs in class folders (``ood/`` for 10%), stored in a zip."""
    import numpy as np
    import torch
    from PIL import Image

    from ood_core.data import load_split

    x, y = load_split("train", seed=seed)
    xo, _ = load_split("near_ood", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(n):
            ood = i % 10 == 9
            pool = xo if ood else x
            j = int(torch.randint(len(pool), (1,), generator=generator))
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
            image = torch.roll(pool[j, 0], shifts=(dy, dx), dims=(0, 1))
            image = (image + 0.02 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
            buffer = io.BytesIO()
            Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(buffer, format="PNG")
            folder = "ood" if ood else str(int(y[j]))
            archive.writestr(f"{folder}/g{i:07d}.png", buffer.getvalue())
    return path


def _model() -> Any:
    from service.demo import demo_model_configs
    from service.engine.served_model import ServedModel
    from service.fit import dist
    from service.settings import Settings

    _, device = dist.init_from_env()
    return ServedModel(demo_model_configs()[0], Settings(device=device or "cpu"))


def _rss_mb() -> dict[str, float]:
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def fit_once(args: argparse.Namespace) -> None:
    """One fit (also under torchrun); rank 0 prints one JSON line."""
    from service.fit import dist
    from service.fit.runner import FitOptions, run_fit
    from service.fit.sources import open_source

    model = _model()
    ranks = dist.current()
    source = open_source(args.data, model.labels)
    hparams = json.loads(args.hparams)
    started = time.perf_counter()
    result = run_fit(
        model, source, FitOptions(args.detector, hparams, batch_size=args.batch_size, workers=args.workers)
    )
    wall = time.perf_counter() - started
    from service.fit.detectors import new_detector

    passes = new_detector(model, args.detector, hparams)[0].fit_passes
    read = result.fit_images * passes + result.calibration_size + result.ood_images
    if ranks.is_main:
        print(json.dumps({"wall_s": wall, "images": result.images, "images_read": read, **_rss_mb()}), flush=True)
    dist.shutdown()


def forward_once(args: argparse.Namespace) -> None:
    """The served path alone: decode + preprocess + forward over the zip's first ``--limit`` images."""
    from service.fit.sources import ImageDecoder, open_source

    model = _model()
    source = open_source(args.data, model.labels)
    index = source.scan()
    decoder = ImageDecoder(model.preprocessor, 25_000_000)
    ordinals = list(range(min(len(index), args.limit)))
    model.forward([model.blank_pixels()] * args.batch_size)  # warm-up
    started = time.perf_counter()
    batch: list[Any] = []
    for ordinal, data in source.read(index, ordinals):
        batch.append(decoder(data, index.refs[ordinal]))  # type: ignore[arg-type]
        if len(batch) == args.batch_size:
            model.forward(batch)
            batch = []
    if batch:
        model.forward(batch)
    wall = time.perf_counter() - started
    print(json.dumps({"images_per_s": len(ordinals) / wall, "images": len(ordinals)}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(mode: str, ranks: int, *args: str) -> dict[str, Any]:
    script = [str(Path(__file__).resolve()), mode, *args]
    if ranks > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--nnodes", "1", "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *script]  # fmt: skip
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{mode} failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


HPARAMS = {"KNN": {"k": 10}}


def offline(args: argparse.Namespace) -> None:
    sizes = [400, 2000] if args.quick else args.sizes
    if args.quick:
        args.workers, args.detectors = [0], args.detectors[:2]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        for size in sizes:
            data = make_zip(Path(tmp) / f"digits-{size}.zip", size)
            limit = str(min(size, args.baseline_images))
            common = ["--data", str(data), "--batch-size", str(args.batch_size)]
            baseline = _child("forward", 1, *common, "--limit", limit)["images_per_s"]
            for detector in args.detectors:
                for ranks in args.ranks:
                    for workers in args.workers:
                        hparams = json.dumps(HPARAMS.get(detector, {}))
                        fit_args = [*common, "--detector", detector, "--hparams", hparams, "--workers", str(workers)]
                        cell = _child("fit-once", ranks, *fit_args)
                        cell.update(detector=detector, size=size, ranks=ranks, workers=workers,
                                    baseline_images_per_s=baseline, load_1m=os.getloadavg()[0])  # fmt: skip
                        cell["fit_images_per_s"] = cell["images_read"] / cell["wall_s"]
                        cell["ratio"] = cell["fit_images_per_s"] / baseline
                        rows.append(cell)
                        print(_row(cell), flush=True)
    report = {"mode": "offline", "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "rows": rows, "checks": _checks(rows)}  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.json or RESULTS_DIR / f"fit-offline-{time.strftime('%Y%m%dT%H%M%S')}.json"
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + _table(rows) + "\n")
    for name, value in report["checks"].items():
        print(f"{name}: {value}")
    print(f"written to {out}")


def _checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    gaussian = sorted(
        (r for r in rows if r["detector"] == "Mahalanobis" and r["ranks"] == 1 and r["workers"] == rows[0]["workers"]),
        key=lambda r: r["size"],
    )
    growth = gaussian[-1]["peak_rss_mb"] - gaussian[0]["peak_rss_mb"] if len(gaussian) > 1 else None
    best: dict[tuple[str, int], float] = {}  # per detector and size, the best worker count of one rank
    for r in rows:
        if r["ranks"] == 1:
            best[(r["detector"], r["size"])] = max(best.get((r["detector"], r["size"]), 0.0), r["ratio"])
    return {
        "gaussian_rss_growth_mb": growth,
        "gaussian_rss_growth_below_100mb": growth is not None and growth < 100,
        "min_single_rank_ratio": min(best.values()) if best else None,
        "single_rank_ratio_at_least_0.9": bool(best) and min(best.values()) >= 0.9,
    }


HEADER = "| detector | images | ranks | workers | wall s | fit img/s | baseline img/s | ratio | peak RSS MB | workers RSS MB |"


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['detector']} | {r['size']} | {r['ranks']} | {r['workers']} | {r['wall_s']:.1f} | {r['fit_images_per_s']:.0f} | "
        f"{r['baseline_images_per_s']:.0f} | {r['ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['workers_peak_rss_mb']:.0f} |"
    )


def _table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER, "|" + "---|" * 10, *(_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["server"]:  # a fit job on a running server: bench/fit_server.py
        import fit_server

        fit_server.main(given[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    off = sub.add_parser("offline", help="fits in fresh processes over generated zips (default)")
    off.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    off.add_argument("--detectors", nargs="+", default=["Mahalanobis", "KNN"])
    off.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    off.add_argument("--batch-size", type=int, default=64)
    off.add_argument("--workers", type=int, nargs="+", default=[0, min(4, os.cpu_count() or 1)])
    off.add_argument("--baseline-images", type=int, default=5000, help="images the baseline forward reads")
    off.add_argument("--quick", action="store_true", help="400 and 2,000 images: a smoke run")
    off.add_argument("--json", type=Path, default=None)
    for name, help_text in (("fit-once", "internal: one fit"), ("forward", "internal: the baseline forward")):
        child = sub.add_parser(name, help=help_text)
        child.add_argument("--data", required=True)
        child.add_argument("--batch-size", type=int, default=64)
        child.add_argument("--detector", default="Mahalanobis")
        child.add_argument("--hparams", default="{}")
        child.add_argument("--workers", type=int, default=0)
        child.add_argument("--limit", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.mode in (None, "offline"):
        offline(args if args.mode else parser.parse_args(["offline", *(argv or sys.argv[1:])]))
    elif args.mode == "fit-once":
        fit_once(args)
    else:
        forward_once(args)


if __name__ == "__main__":
    main()
