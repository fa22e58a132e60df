"""merge_across_ranks on a real 2-process Gloo group on 127.0.0.1: both ranks end with identical states, equal
(allclose) to one process fitting all the data, for every detector that needs a fit (Gaussian, KNN's gathered
bank, the two-pass ViM, OpenMax and ReAct, ...); variable-length gathers; mismatches refused on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .fit_cases import CASES, assert_same_state

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ood_core.distributed_worker", str(r), str(WORLD), str(port), str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_gloo_ranks_merge_to_the_state_of_one_process(ranks_out: Path, name: str) -> None:
    case = CASES[name]
    z, y = case.data()
    whole = case.make().fit_features(z, y)
    states = [load_file(str(ranks_out / str(r) / f"{name}.safetensors")) for r in range(WORLD)]
    for key in states[0]:  # every rank merged in rank order: bit for bit the same
        assert torch.equal(states[0][key], states[1][key]), key
    det = case.make()
    for key, t in states[0].items():
        setattr(det, key, t)
    det._mark_fitted()
    assert_same_state(det, whole, case.tol)


def test_all_gather_tensor_concatenates_variable_rows_in_rank_order(ranks_out: Path) -> None:
    want = torch.cat([torch.arange(6.0 * (2 * r + 1)).reshape(2 * r + 1, 2, 3) + 100 * r for r in range(WORLD)])
    for r in range(WORLD):
        assert torch.equal(load_file(str(ranks_out / str(r) / "gathered.safetensors"))["gathered"], want)


def test_a_mismatch_between_ranks_is_refused_on_every_rank(ranks_out: Path) -> None:
    for r in range(WORLD):
        assert "other hyperparameters" in (ranks_out / str(r) / "refused.txt").read_text()
