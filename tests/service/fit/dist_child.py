"""Run under ``torchrun`` by ``test_torchrun.py``: every rank fits each detector of ``--detectors`` (JSON: class ->
hyperparameters) on ``--data`` with :func:`service.fit.runner.run_fit`; rank 0 writes each state to
``--out/<class>.safetensors`` and the results to ``--out/results.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ood_core.state import write_atomic
from service.demo import demo_model_configs
from service.engine.served_model import ServedModel
from service.fit import dist
from service.fit.runner import FitOptions, run_fit
from service.fit.sources import open_source
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--detectors", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    ranks, _ = dist.init_from_env("cpu")
    assert ranks.world == 2, ranks
    model = ServedModel(demo_model_configs()[0], Settings(device="cpu"))
    source = open_source(args.data, model.labels)
    results = {}
    for name, hparams in json.loads(args.detectors).items():
        result = run_fit(model, source, FitOptions(name, hparams, batch_size=25))
        results[name] = {
            "images": result.images,
            "calibration_size": result.calibration_size,
            "metrics": result.metrics,
        }
        if ranks.is_main:
            write_atomic(args.out / f"{name}.safetensors", result.state)
    if ranks.is_main:
        write_atomic(args.out / "results.json", json.dumps(results).encode())
    dist.shutdown()


if __name__ == "__main__":
    main()
