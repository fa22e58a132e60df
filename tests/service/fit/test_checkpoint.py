"""A fit killed (SIGKILL) right after a checkpoint resumes with ``--resume`` to the state of an uninterrupted fit,
reading only what the checkpoint does not hold; a checkpoint of another fit is refused; the files go away when
the fit succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service.fit.conftest import ROOT, assert_same_state

pytestmark = pytest.mark.timeout(300)


def killed_fit(args: list[str], after_checkpoints: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OOD_FIT_TEST_KILL_AFTER_CHECKPOINTS": str(after_checkpoints), "PYTHONPATH": str(ROOT)}
    env.pop("OOD_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "service.fit", "--no-progress", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "hparams", "kill_after", "resumed"),
    [("Mahalanobis", {}, 3, 120), ("KNN", {"k": 5}, 2, 80), ("ViM", {"d": 16}, 9, 270 + 80)],
)  # 270 fit images, a checkpoint every 40 and at the end of a pass: ViM's 9th is 80 images into its second pass
def test_a_killed_fit_resumes_to_the_same_state(
    name: str,
    hparams: dict[str, Any],
    kill_after: int,
    resumed: int,
    containers: dict[str, str],
    ood_fit: Any,
    tmp_path: Path,
) -> None:
    out, checkpoint = tmp_path / "state.safetensors", tmp_path / "fit.ckpt"
    args = [
        "--detector", name, "--hparams", json.dumps(hparams), "--data", containers["zip"], "--workers", "0",
        "--batch-size", "20", "--checkpoint-every", "40", "--checkpoint", str(checkpoint), "--out", str(out),
    ]  # fmt: skip
    run = killed_fit(args, kill_after)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert checkpoint.is_file() and not out.exists()
    status, stdout, stderr = ood_fit(*args, "--resume", "--json", str(tmp_path / "report.json"))
    assert status == 0, stderr
    assert f"resumed     {resumed} images came from the checkpoint" in stdout
    assert not checkpoint.exists() and not list(tmp_path.glob("fit.ckpt*"))
    fresh = tmp_path / "fresh.safetensors"
    status, _, stderr = ood_fit(*args[:10], "--out", str(fresh))  # the same fit, without checkpoints
    assert status == 0, stderr
    assert_same_state(out.read_bytes(), fresh.read_bytes(), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_another_fit_is_refused(containers: dict[str, str], ood_fit: Any, tmp_path: Path) -> None:
    out, checkpoint = tmp_path / "state.safetensors", tmp_path / "fit.ckpt"
    args = [
        "--detector", "Mahalanobis", "--data", containers["zip"], "--workers", "0", "--batch-size", "20",
        "--checkpoint-every", "40", "--checkpoint", str(checkpoint), "--out", str(out),
    ]  # fmt: skip
    assert killed_fit(args, 1).returncode == -signal.SIGKILL
    status, _, stderr = ood_fit(*args, "--resume", "--seed", "1")
    assert status == 1 and "checkpoint of another fit" in stderr and not out.exists()
    status, _, stderr = ood_fit(*args, "--resume", "--seed", "0")
    assert status == 0, stderr


def test_resume_without_a_checkpoint_starts_from_the_beginning(
    containers: dict[str, str], ood_fit: Any, tmp_path: Path
) -> None:
    out = tmp_path / "state.safetensors"
    status, stdout, stderr = ood_fit(
        "--detector", "RMD", "--data", containers["dir"], "--workers", "0", "--resume", "--out", str(out)
    )
    assert status == 0, stderr
    assert out.is_file() and "from the checkpoint" not in stdout
