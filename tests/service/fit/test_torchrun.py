"""``torchrun --nproc-per-node 2`` (Gloo on the CPU, rendezvous on a free loopback port): the merged fit of two ranks
equals the one-process fit for every detector that needs fitting; ``-m service.fit`` writes the state once, from
rank 0; a rank that raises makes every rank exit non-zero and nothing is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.engine.served_model import ServedModel
from service.fit.runner import FitOptions, run_fit
from service.fit.sources import open_source
from tests.service.fit.conftest import OOD_IMAGES, PER_CLASS, ROOT, assert_same_state
from tests.service.fit.test_cli import HPARAMS, fitted_classes

pytestmark = pytest.mark.timeout(600)
TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [
        str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args,
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("OOD_CONFIG", None)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=500)


def test_two_ranks_equal_one_process_for_every_fitted_detector(
    digits_model: ServedModel,
    containers: dict[str, str],
    directory_states: dict[str, tuple[bytes, dict[str, float]]],
    tmp_path: Path,
) -> None:
    """The one-process state is ``ood-fit``'s of test_cli when it ran, else ``run_fit``'s here."""
    detectors = {name: HPARAMS.get(name, {}) for name in fitted_classes()}
    run = torchrun(
        str(ROOT / "tests" / "service" / "fit" / "dist_child.py"),
        "--data", containers["dir"], "--detectors", json.dumps(detectors), "--out", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    source = open_source(containers["dir"], digits_model.labels)
    for name, hparams in detectors.items():
        result = results[name]
        assert result["images"] == len(source.scan()) and result["calibration_size"] == round(0.1 * 6 * PER_CLASS)
        if name in directory_states:
            one, metrics = directory_states[name]
        else:
            fitted = run_fit(digits_model, source, FitOptions(name, hparams, batch_size=25))
            one, metrics = fitted.state, fitted.metrics or {}
        assert_same_state((tmp_path / f"{name}.safetensors").read_bytes(), one, rtol=1e-3, atol=1e-4)
        assert result["metrics"] == pytest.approx(metrics, abs=2e-3), name  # one tied pair flipped: 1 / (30 x 48)


def test_torchrun_ood_fit_writes_once_and_a_failing_rank_writes_nothing(
    containers: dict[str, str], ood_fit: Any, tmp_path: Path
) -> None:
    out, report = tmp_path / "two.safetensors", tmp_path / "two.json"
    args = ["-m", "service.fit", "--no-progress", "--detector", "Mahalanobis", "--data", containers["wds"],
            "--workers", "1", "--out", str(out), "--json", str(report)]  # fmt: skip
    run = torchrun(*args)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("state written to") == 1  # rank 0 only
    single = tmp_path / "one.safetensors"
    status, _, stderr = ood_fit("--detector", "Mahalanobis", "--data", containers["wds"], "--out", str(single))
    assert status == 0, stderr
    assert_same_state(out.read_bytes(), single.read_bytes(), rtol=1e-3, atol=1e-4)
    assert json.loads(report.read_text())["images"] == 6 * PER_CLASS + OOD_IMAGES

    failing = tmp_path / "failed.safetensors"
    args[args.index(str(out))] = str(failing)
    run = torchrun(*args, env={"OOD_FIT_TEST_FAIL_RANK": "1"})
    assert run.returncode != 0
    assert "ood-fit [rank 1/2]: error: RuntimeError: test hook" in run.stderr
    assert "ood-fit [rank 0/2]: error: rank 1 failed while fitting" in run.stderr
    assert not failing.exists() and not list(tmp_path.glob(".failed*"))
