"""The README's library example runs as printed and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_library_example_fits_saves_loads_and_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the service client's example runs against a live server in tests/service/client/test_readme.py
    blocks = [block for block in _python_blocks() if "service.client" not in block]
    assert len(blocks) == 1, "the README should hold exactly one library example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README

    assert (tmp_path / "mahalanobis.safetensors").is_file()
    metrics = namespace["metrics"].compute()  # type: ignore[attr-defined]
    assert metrics["AUROC"] > 0.85  # near-OOD digits 6-9 against ID digits 0-5
    scores, y_id = namespace["scores"], namespace["y_id"]
    threshold = float(namespace["threshold"])  # type: ignore[arg-type]
    id_flagged = (scores[: len(y_id)] > threshold).float().mean().item()  # type: ignore[index, arg-type]
    assert id_flagged < 0.15  # ~5% of ID images at the 95% TPR threshold (calibration split, 163 images)
    p_values = namespace["p_values"]
    assert float(p_values.min()) > 0 and float(p_values.max()) <= 1  # type: ignore[attr-defined]
