"""``ood-serve`` / ``python -m service``: run the service with uvicorn.

Before torch is imported, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``: OpenMP threads that spin while waiting
made forwards several times slower on shared or CPU-limited cores (docs/benchmark-serve.md). Set the variable to
override it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP runtime starts

import argparse
import signal
from types import FrameType

import uvicorn

from service.app import create_app
from service.server import uvicorn_config
from service.settings import load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ood-serve", description="Out-of-distribution scoring service")
    parser.add_argument("--host", default=os.environ.get("OOD_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("OOD_PORT", "8000")))
    parser.add_argument("--config", default=None, help="YAML/JSON config file (default: $OOD_CONFIG)")
    return parser.parse_args(argv)


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        app = create_app(settings)
    except (OSError, ValueError) as exc:  # unreadable or invalid config / keys file (pydantic errors are ValueErrors)
        raise SystemExit(f"ood-serve: invalid configuration: {exc}") from exc
    # uvicorn handles SIGTERM/SIGINT (stop accepting, finish open requests, lifespan shutdown drains every
    # batcher) and then re-raises the signal to the previous handler: this one makes a graceful stop exit 0
    signal.signal(signal.SIGTERM, _exit_zero)
    server = uvicorn.Server(uvicorn_config(app, settings, host=args.host, port=args.port))
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        raise SystemExit(3)


if __name__ == "__main__":
    main()
