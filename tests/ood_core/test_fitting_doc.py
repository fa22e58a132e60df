"""The first example of docs/fitting.md runs as printed: shards exchanged pass by pass and a checkpointed,
resumed fit both reach the one-call state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "fitting.md"


def test_fitting_example_merges_shards_and_resumes_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "fitting_example"}
    exec(compile(example, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    assert (tmp_path / "vim.fit.safetensors").is_file() and namespace["meta"] == {"rows_done": "500"}
    reference, z = namespace["reference"], namespace["z"]
    want = reference.predict_features(z)  # type: ignore[attr-defined]
    for det in [*namespace["detectors"], namespace["det"]]:  # type: ignore[misc]
        torch.testing.assert_close(
            det.predict_features(z), want, rtol=1e-4, atol=1e-4 * float(want.abs().max())
        )  # float32 features
