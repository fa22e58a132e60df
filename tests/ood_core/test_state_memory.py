"""Loading a large state from a path streams it: peak memory about 1x the tensors, not a bytes copy plus tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ood_core.detector import KNN
from ood_core.state import save_detector

#: the child loads the state and reports its peak resident set (VmHWM) before and after, in kB
CHILD = """
import json, sys
import ood_core.detector  # imported before measuring, as a server has it
from ood_core.state import load_detector

def peak_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

before = peak_kb()
detector = load_detector(sys.argv[1])
print(json.dumps({"before": before, "after": peak_kb(), "rows": int(detector.bank.shape[0])}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_loading_a_200_mb_state_from_a_path_peaks_near_its_size(tmp_path: Path) -> None:
    rows, dim = 100_000, 512  # float32 bank: 204.8 MB
    bank = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    bank /= torch.linalg.vector_norm(bank, dim=1, keepdim=True)
    detector = KNN(None, k=5)
    detector.bank = bank
    detector._mark_fitted()
    path = tmp_path / "knn.safetensors"
    size = len(save_detector(detector, path))
    del bank, detector
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == rows
    growth = (report["after"] - report["before"]) * 1024
    # one copy of the tensors (~1.0x) plus small temporaries; reading the file into bytes first would be >= 2x
    assert growth < 1.4 * size, f"peak RSS grew by {growth / size:.2f}x the state's size"
