"""What ``bench/serve.py`` measures against: the servers (the service, a baseline tree, the LitServe peer) as
pausable processes, the model scenarios and their states, and the in-process limit."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server in a subprocess on a free loopback port (its own process group); waits until it is ready.

    ``kind="service"``: ``python -m service`` from ``source`` (another checkout for ``--baseline``), ready at
    ``/readyz``, scored at ``/v1/models/{model}/score``, stopped with SIGTERM. ``kind="litserve"``: the LitServe
    peer (``bench/litserve_peer.py``, ``args`` its options), ready at ``/health``, scored at ``/predict``, stopped
    with SIGINT (it ignores SIGTERM). ``prefix``: a launcher to run the service under (``py-spy record ... --``),
    whose child is then the server."""

    def __init__(
        self,
        env: dict[str, str],
        config: Path | None,
        log_path: Path,
        source: Path = ROOT,
        prefix: list[str] | None = None,
        kind: str = "service",
        args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kind = kind
        self.wrapped = bool(prefix)
        if kind == "litserve":
            command = [sys.executable, str(ROOT / "bench" / "litserve_peer.py"), "--port", str(self.port)]
            command += args or []
        else:
            command = [
                *(prefix or []),
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        if config is not None:
            command += ["--config", str(config)]
        self.ready_path = "/health" if kind == "litserve" else "/readyz"
        self.log = log_path.open("wb")
        path = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            command,
            cwd=source,
            env={**os.environ, **env, "PYTHONPATH": path},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def score_path(self, model: str, detectors: list[str] | None) -> str:
        if self.kind == "litserve":
            return "/predict"
        return f"/v1/models/{model}/score" + (f"?detectors={','.join(detectors)}" if detectors else "")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s} s; log: {self.log.name}")

    def pause(self) -> None:
        """SIGSTOP its process group: an idle server costs nothing while another is measured (LitServe's idle
        workers poll, about one core)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop_after_ready(self) -> None:
        try:
            self.wait_ready()
        finally:
            self.stop()

    def server_pid(self) -> int:
        """The server's pid (the launcher's child when ``prefix`` was given)."""
        if not self.wrapped:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0]) if children else self.process.pid

    def stop(self) -> None:
        if self.wrapped and self.process.poll() is None:  # stop the server; the launcher exits after it
            os.kill(self.server_pid(), signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(60)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if self.kind == "litserve" else signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group: the server and its workers
                self.process.wait()
        self.log.close()


SCENARIOS = {"demo": None, "resnet18": 224, "resnet18-64": 64, "config": None}
"""Scenario -> input size of the torchvision resnet18 (``None``: the embedded digits demo; ``config``: the model
of ``--config``)."""


def config_scenario(source: Path, workdir: Path, state_dir: Path) -> Path:
    """``--config``'s file with the state directory replaced by the benchmark's (a JSON copy in ``workdir``)."""
    from service.settings import read_config_file

    values = read_config_file(source)
    values["state_dir"] = str(state_dir)
    path = workdir / "config.json"
    path.write_text(json.dumps(values, indent=2, default=str))
    return path


def resnet18_config(workdir: Path, state_dir: Path, size: int = 224) -> Path:
    """Random-weight resnet18 (10 classes) saved as safetensors, plus a service config file serving it at
    ``size`` x ``size``."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=10).eval()
    weights = workdir / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    config = {
        "state_dir": str(state_dir),
        "models": [
            {
                "name": "resnet18",
                "source": "torchvision",
                "architecture": "resnet18",
                "weights": str(weights),
                "num_classes": 10,
                "input_size": [size, size],
                "preprocessing": {"mode": "RGB"},
                "nodes": {"logits": "fc", "features": "flatten", "feature_maps": "layer4"},
                "heads": {"features": ["fc"]},
            }
        ],
    }
    path = workdir / f"resnet18-{size}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


class InProcess:
    """The served model and its active detectors loaded in this process through the service's own code (same
    config, same state directory, same decode + preprocessing + forward + detectors), minus HTTP and the queue."""

    def __init__(self, config: Path | None, state_dir: Path) -> None:
        from service.demo import demo_model_configs
        from service.engine.served_model import ServedModel
        from service.settings import load_settings
        from service.states.manager import StateManager

        self.settings = load_settings(config, state_dir=state_dir)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inprocess")
        configs = self.settings.models or demo_model_configs()
        self.model = ServedModel(next(c for c in configs if c.task == "classification"), self.settings)
        StateManager(state_dir).load_stored(self.model)

    def install_energy_state(self, images: int = 64) -> None:
        """Calibrate an EnergyBased detector on random images and store it (for the random-weight resnet18)."""
        import torch

        from service.states.fitting import fit_state
        from service.states.store import StateStore

        pixels = list(torch.randint(0, 256, (images, 3, *self.model.config.input_size), dtype=torch.uint8))
        outputs = self.model.forward_chunks(pixels, chunk=32)
        data = fit_state(self.model, "EnergyBased", {}, outputs, None, outputs)
        StateStore(self.settings.state_dir).put(self.model.name, "energy", data, "EnergyBased")

    def batch_scorer(
        self, image: bytes, names: list[str] | None = None, predecoded: bool = False
    ) -> Callable[[int], object]:
        """``score_batch(n)``: decode ``image`` n times and score the batch (``names``: the detectors; all).
        ``predecoded``: decode it once and score the same pixels (the model's own limit: on a GPU box the service
        decodes on many cores while this loop would decode on one)."""
        from service.engine.decode import RawImage, decode_image
        from service.engine.items import ScoreItem
        from service.engine.scoring import process_batch

        model, max_pixels = self.model, self.settings.max_pixels
        detectors = tuple(model.detectors[name] for name in (names or sorted(model.detectors)))

        decoded = model.preprocessor.pixels(decode_image(RawImage(image, "bench"), max_pixels))

        def score_batch(size: int) -> object:
            if predecoded:
                pixels = [decoded] * size
            else:
                pixels = [
                    model.preprocessor.pixels(decode_image(RawImage(image, "bench"), max_pixels)) for _ in range(size)
                ]
            return process_batch(model, [ScoreItem(p, detectors) for p in pixels])

        return score_batch


def start_servers(
    scenario: str, args: argparse.Namespace, workdir: Path, config: Path | None, state_dir: Path
) -> dict[str, Server]:
    """Every HTTP mode's server, started one after the other (the first start fits the demo states once)."""
    servers: dict[str, Server] = {}
    sources = [("", ROOT, args.max_wait_ms)]
    if args.baseline:
        sources.append(("-baseline", args.baseline.resolve(), args.baseline_wait_ms))
    for suffix, source, wait_ms in sources:
        # each source tree its own state directory: an older tree may not read the state files a newer one
        # writes (and would then serve no detectors, doing less work per image)
        states = state_dir if not suffix else state_dir.with_name(state_dir.name + suffix)
        if suffix and config is not None and not states.exists():
            shutil.copytree(state_dir, states)
            for active in states.rglob("active.json"):  # trees before the version history read no "history"
                record = json.loads(active.read_text())
                record.pop("history", None)
                active.write_text(json.dumps(record))
        for mode, batch_size in (("batched", args.max_batch_size), ("unbatched", 1)):
            if mode not in args.modes:
                continue
            env = {
                "OOD_MAX_BATCH_SIZE": str(batch_size),
                "OOD_MAX_WAIT_MS": str(wait_ms),
                "OOD_STATE_DIR": str(states),
                "OOD_LOG_LEVEL": "WARNING",
                **dict(item.split("=", 1) for item in args.server_env),
            }
            name = mode + suffix
            servers[name] = Server(env, config, workdir / f"{scenario}-{name}.log", source)
            servers[name].wait_ready()
            servers[name].pause()
    if "litserve" in args.modes:
        peer_args = ["--state-dir", str(state_dir), "--max-batch-size", str(args.max_batch_size)]
        peer_args += ["--max-wait-ms", str(args.max_wait_ms)]
        if args.detectors:
            peer_args += ["--detectors", *args.detectors]
        env = dict(item.split("=", 1) for item in args.server_env)
        servers["litserve"] = Server(env, config, workdir / f"{scenario}-litserve.log", kind="litserve", args=peer_args)
        servers["litserve"].wait_ready()
        servers["litserve"].pause()
    return servers


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
