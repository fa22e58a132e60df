"""``ood-serve`` / ``python -m service``: run the service with uvicorn.

Before torch is imported, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``: OpenMP threads that spin while waiting
made forwards several times slower on shared or CPU-limited cores (docs/benchmark-serve.md). Set the variable to
override it.

``--help`` lists every setting of :class:`service.settings.Settings` (config-file key, ``OOD_`` variable, default)
and ``--version`` the package version, both without importing torch. A configuration that cannot work (a file
that does not parse, an unknown key, a missing weights file, a model that fails to build) stops the process with
one line on stderr and a non-zero exit, never with a traceback or a server that answers 503 to everything.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP runtime starts

import argparse
import json
import signal
import textwrap
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from service.config_errors import check_paths, describe_config_error
from service.settings import ConfigFileError, Settings, load_settings

if TYPE_CHECKING:
    from service.engine.catalog import ModelCatalog

EXIT_NOT_STARTED = 3
"""Exit status when uvicorn could not start (e.g. the port is taken); configuration errors and failed start-ups
exit with 1 and their one line."""


def package_version() -> str:
    try:
        return version("ood-serve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def settings_help(width: int = 100) -> str:
    """Every setting: its config-file key, environment variable and default, then what it does."""
    lines = [
        "settings (highest first: environment variable OOD_<KEY>, the --config file's key, the default):",
    ]
    for name, field in Settings.model_fields.items():
        default = _default(field.get_default(call_default_factory=True))
        lines.append(f"  {name:<26} OOD_{name.upper():<26} default: {default}")
        description = " ".join((field.description or "").replace("``", "").split())
        lines.extend(textwrap.wrap(description, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines.append("")
    lines.append("models is a list of model configs (see the README's Configuration); empty serves the digits demo.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ood-serve",
        description="Out-of-distribution scoring service",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--host", default=os.environ.get("OOD_HOST", "127.0.0.1"), help="address to bind (OOD_HOST; 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("OOD_PORT", "8000")), help="port to bind (OOD_PORT; 8000)"
    )
    parser.add_argument("--config", default=None, help="YAML/JSON config file (OOD_CONFIG; none)")
    return parser.parse_args(argv)


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


class StartupWatchingServer(uvicorn.Server):
    """A uvicorn server that stops when the app's start-up fails (a model that does not build, weights that do not
    fit its architecture, an unreadable state volume): the process exits instead of answering 503 forever."""

    def __init__(self, config: uvicorn.Config, catalog: ModelCatalog) -> None:
        super().__init__(config)
        self.catalog = catalog
        self.startup_failure: str | None = None

    async def on_tick(self, counter: int) -> bool:
        if self.catalog.failure is not None:
            self.startup_failure = self.catalog.failure
            return True
        return await super().on_tick(counter)


def _configure(config: str | None) -> tuple[Settings, Any]:
    """Settings and the app, or :class:`SystemExit` with one line saying what is wrong."""
    try:
        settings = load_settings(config)
        check_paths(settings)
        if settings.workers > 1:  # OOD_WORKERS: each worker process builds its own app (service.server)
            return settings, None
        from service.app import create_app  # imports torch: not for --help / --version

        return settings, create_app(settings)
    except (OSError, ValueError) as exc:  # unreadable / invalid file, keys file, paths (pydantic: ValueError)
        where = config or os.environ.get("OOD_CONFIG")
        source = f" (config file {where})" if where and not isinstance(exc, ConfigFileError) else ""
        message = f"ood-serve: invalid configuration{source}: {describe_config_error(exc)}"
        raise SystemExit(message) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings, app = _configure(args.config)
    from service.server import run_workers, uvicorn_config

    if app is None:  # OOD_WORKERS > 1: a supervisor and the worker processes
        raise SystemExit(run_workers(settings, args.host, args.port))

    # uvicorn handles SIGTERM/SIGINT (stop accepting, finish open requests, lifespan shutdown drains every
    # batcher) and then re-raises the signal to the previous handler: this one makes a graceful stop exit 0
    signal.signal(signal.SIGTERM, _exit_zero)
    server = StartupWatchingServer(
        uvicorn_config(app, settings, host=args.host, port=args.port), app.state.context.catalog
    )
    server.run()
    if server.startup_failure is not None:
        raise SystemExit("ood-serve: " + " ".join(server.startup_failure.split()))
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        raise SystemExit(EXIT_NOT_STARTED)


if __name__ == "__main__":
    main()
