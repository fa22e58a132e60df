"""The README's client example runs as written against the real service (files of those names in the folder)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.client import OODClient
from tests.service.conftest import API_KEY, ROOT, digit_png
from tests.service.jobs.archives import digits_zip

pytestmark = pytest.mark.timeout(300)


def readme_block(starts: str) -> str:
    blocks = re.findall(r"```(?:python|bash)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith(starts)]
    return block


def test_the_readme_client_example_runs(
    live_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = readme_block("from service.client import")
    assert "http://localhost:8000" in code
    (tmp_path / "digit.png").write_bytes(digit_png(0))
    noise = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cat.jpg", format="JPEG")
    buffer = io.BytesIO()
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((32, 32), dtype=np.uint8))).save(buffer, "PNG")
    (tmp_path / "mosaic.png").write_bytes(buffer.getvalue())
    with OODClient(live_server) as client:
        client.download_state("digits", "mahalanobis", tmp_path / "mahalanobis.safetensors")
    (tmp_path / "digits.zip").write_bytes(digits_zip())
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://localhost:8000", live_server), "README.md", "exec"), {"KEY": API_KEY})
    printed = re.fullmatch(r"(True|False) (\(\d+, \d+\)) (\{.*\}) (True|False)", capsys.readouterr().out.strip())
    assert printed is not None
    assert printed[1] == "True" and printed[2] == "(64, 64)" and "'AUROC'" in printed[3]  # a noise image is OOD
    with OODClient(live_server) as client:
        assert {"my-mahalanobis", "my-knn"} <= {d.name for d in client.detectors("digits")}
    assert os.getcwd() == str(tmp_path)
