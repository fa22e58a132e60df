"""``ood-fit``: fit, calibrate and evaluate a detector offline, on one process or under torchrun; write its state.

``ood-fit [--config models.yaml] [--model r18] --detector Mahalanobis [--hparams JSON] --data PATH [PATH ...]
[--calibration-share 0.1] [--tpr 0.95] [--seed 0] [--batch-size 64] [--workers 4] [--skip-invalid]
[--checkpoint-every N] [--checkpoint FILE] [--resume] [--device cuda] --out state.safetensors [--json report.json]``

With no ``--config`` (nor ``OOD_CONFIG``) the embedded demo models, as for ``ood-serve`` (``--model digits``, the
default: the first configured model). The state is the service's ``save_detector`` format, fitted through the
model's own decoding, preprocessing and forward, so it uploads as is (``PUT /v1/models/{model}/detectors/{name}``).
It is written atomically, by rank 0 only, once every rank has finished; on any error nothing is written and the
exit status is 1 (2 for bad arguments, 130 when interrupted) with one line on stderr saying why.

``--hparams '{"grid": {"k": [1, 5, 50]}}'`` searches the grid on one process (:mod:`service.fit.grid`): the data
needs ``ood/``; the state of the best candidate by AUROC is written, and the summary and the ``--json`` report
(``search``) list every candidate's metrics or error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.fit import dist
from service.fit.report import ProgressBar, report_json, summary

if TYPE_CHECKING:
    from service.engine.served_model import ServedModel
    from service.settings import Settings

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _hparams(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"k\": 10}'")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ood-fit", description="Fit an OOD detector offline (also under torchrun)")
    p.add_argument("--config", help="the ood-serve YAML/JSON config (default: $OOD_CONFIG, else the demo models)")
    p.add_argument("--model", help="model name from the config (default: the first one; demo: digits)")
    p.add_argument(
        "--detector",
        dest="detector_class",
        metavar="DETECTOR",
        required=True,
        help="detector class, e.g. Mahalanobis, KNN, ViM",
    )
    p.add_argument(
        "--hparams",
        type=_hparams,
        default={},
        help='constructor arguments as a JSON object; with "grid" a search: \'{"grid": {"k": [1, 5, 50]}}\' fits '
        "each combination, writes the best by AUROC on ood/ and reports all",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="class-folder directory, .zip, .tar(.gz), WebDataset shards (brace pattern or several) or .safetensors",
    )
    p.add_argument("--calibration-share", type=float, default=0.1, help="ID share held out for calibration")
    p.add_argument("--tpr", type=float, default=0.95, help="target ID true-positive rate of the threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration hold-out")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding worker processes")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count undecodable images")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N images")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: <out>.checkpoint)")
    p.add_argument("--resume", action="store_true", help="resume from the checkpoint if there is one")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--out", required=True, type=Path, help="where to write the state (safetensors)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    return p.parse_args(argv)


def _model(args: argparse.Namespace, device: str | None) -> tuple[ServedModel, Settings]:
    """The model to fit for (built like ``ood-serve`` builds it, on ``device``) and the settings."""
    from service.engine.served_model import ServedModel
    from service.errors import BadRequestError
    from service.settings import load_settings

    try:
        settings = load_settings(args.config)
    except (OSError, ValueError) as exc:  # unreadable or invalid file (pydantic errors are ValueErrors)
        raise BadRequestError(f"invalid configuration: {exc}") from exc
    configs = settings.models
    if not configs:
        from service.demo import demo_model_configs

        configs = demo_model_configs()
    names = [c.name for c in configs]
    name = args.model or names[0]
    if name not in names:
        raise BadRequestError(f"no model {name!r} in the configuration; models: {', '.join(names)}")
    overrides = {"device": device} if device is not None else {}
    return ServedModel(configs[names.index(name)], settings.model_copy(update=overrides)), settings


def _fit(args: argparse.Namespace, ranks: dist.Ranks, device: str | None) -> None:
    from ood_core.state import write_atomic
    from service.fit.runner import FitOptions, run_fit
    from service.fit.sources import SourceLimits, open_source

    model, settings = _model(args, device)
    data = args.data[0] if len(args.data) == 1 else args.data
    limits = SourceLimits(max_pixels=settings.max_pixels)
    source = open_source(data, model.labels, limits=limits, skip_invalid=args.skip_invalid)
    checkpoint = args.checkpoint or args.out.with_name(args.out.name + ".checkpoint")
    options = FitOptions.from_parameters(
        args,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        checkpoint_path=checkpoint if args.checkpoint_every or args.resume else None,
        resume=args.resume,
    )
    with ProgressBar(enabled=ranks.is_main and not args.no_progress) as bar:
        result = run_fit(model, source, options, progress=bar.update)
    report = report_json(result, args.detector_class, model.name)

    def write() -> None:
        if not ranks.is_main:
            return
        if args.json is not None:
            write_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode())
        try:
            write_atomic(args.out, result.state)
        except BaseException:
            if args.json is not None:
                args.json.unlink(missing_ok=True)
            raise

    dist.staged(ranks, "writing the state", write)
    if ranks.is_main:
        print(summary(result, args.detector_class, model.name, args.out))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ranks = dist.Ranks()
    prefix = "ood-fit"
    try:
        ranks, device = dist.init_from_env(args.device)
        if ranks.distributed:
            prefix = f"ood-fit [rank {ranks.rank}/{ranks.world}]"
        _fit(args, ranks, device)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; nothing written", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    finally:
        dist.shutdown()


def _one_line(exc: BaseException) -> str:
    from service.errors import ServiceError

    text = exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(text).split())
