"""The peer of ``bench/serve.py``: the same model, preprocessing and detector states served by LitServe.

Run by the benchmark as a subprocess (``python bench/litserve_peer.py --port P --state-dir D [--config F]``).
LitServe is not a dependency of this project: ``bench/serve.py --modes litserve`` needs it installed with
``.venv/bin/pip install --target build/litserve --no-deps litserve==0.2.19 pyzmq`` (its other requirements,
FastAPI and uvicorn, are the project's), and only this process puts ``build/litserve`` on ``sys.path``.

The LitAPI does what the service does per image, through the service's own code: ``decode_request`` decodes and
preprocesses the multipart ``files`` part (:func:`service.engine.decode.decode_image`,
:meth:`~service.engine.preprocess.Preprocessor.pixels`), ``predict`` is :func:`service.engine.scoring.process_batch`
on the batch (one forward, every detector, verdicts and p-values), ``encode_response`` builds the service's
answer for one image. LitServe batches with ``max_batch_size`` and ``batch_timeout`` (``--max-wait-ms``) and runs
the model in its own worker process behind its API server process.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build" / "litserve"))
sys.path.insert(0, str(ROOT))

import litserve as ls  # noqa: E402
from fastapi import Request  # noqa: E402


class OODScoring(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, config: Path | None, state_dir: Path, detectors: list[str] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_path, self.state_dir, self.wanted = config, state_dir, detectors

    def setup(self, device: str) -> None:
        from service.demo import demo_model_configs
        from service.engine.served_model import ServedModel
        from service.settings import load_settings
        from service.states.manager import StateManager

        settings = load_settings(self.config_path, state_dir=self.state_dir)
        configs = settings.models or demo_model_configs()
        self.model = ServedModel(next(c for c in configs if c.task == "classification"), settings)
        StateManager(self.state_dir).load_stored(self.model)
        names = self.wanted or sorted(self.model.detectors)
        self.detectors = tuple(self.model.detectors[name] for name in names)
        self.max_pixels = settings.max_pixels

    def decode_request(self, request: Request) -> Any:  # a Request annotation: LitServe hands over the parsed form
        from service.engine.decode import RawImage, decode_image

        upload = request["files"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        return self.model.preprocessor.pixels(decode_image(RawImage(data, "files[0]"), self.max_pixels))

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, pixels: list[Any]) -> list[Any]:
        from service.engine.items import ScoreItem
        from service.engine.scoring import process_batch

        return process_batch(self.model, [ScoreItem(p, self.detectors) for p in pixels])

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, result: Any) -> dict[str, Any]:
        per_image = {
            "prediction": result.prediction(self.model.labels),
            "detectors": {a.name: result.verdicts[a.name] for a in self.detectors},
        }
        return {"model": self.model.name, "results": [per_image]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--detectors", nargs="*", default=None)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    api = OODScoring(
        args.config,
        args.state_dir,
        args.detectors,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.max_wait_ms / 1000.0,
        api_path="/predict",
    )
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning", num_api_servers=1)


if __name__ == "__main__":
    main()
