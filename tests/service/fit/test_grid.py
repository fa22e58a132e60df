"""Grid searches in a fit (``hparams = {"grid": {...}}``) over the digits tree (classes 0-5, ``ood/`` = digits 6-9):
every image goes through the forward once per pass whatever the number of candidates, each candidate's metrics
equal a single fit's with its hyperparameters, the best by AUROC (first on ties) is the state written, a bad
candidate is a row with its error, bad grids and data without ``ood/`` are refused; ``ood-fit`` with a grid writes
the best and reports every candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ood_core.state import read_state_info
from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.fit.grid import MAX_CANDIDATES
from service.fit.runner import FitOptions, FitResult, run_fit
from service.fit.sources import DataSourceError, open_source
from tests.service.fit.conftest import DigitsTree, assert_same_state

pytestmark = pytest.mark.timeout(300)


def fit(model: ServedModel, data: str, cls: str, hparams: dict[str, Any], **kw: Any) -> tuple[FitResult, int]:
    """``run_fit`` and the number of images its forwards saw."""
    seen = [0]

    def forward(pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        seen[0] += len(pixels)
        return model.forward(pixels)

    options = FitOptions(cls, hparams, workers=0, batch_size=50, **kw)
    return run_fit(model, open_source(data, model.labels), options, forward=forward), seen[0]


def no_ood_tree(tree: DigitsTree, root: Path) -> Path:
    for name, png in tree.pngs.items():
        if not name.startswith("ood/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(png)
    return root


@pytest.mark.parametrize(("cls", "grid", "passes"), [("KNN", {"k": [1, 5, 50]}, 1), ("ViM", {"d": [8, 16]}, 2)])
def test_a_grid_streams_once_keeps_the_best_by_auroc_and_each_candidate_equals_its_single_fit(
    cls: str, grid: dict[str, list[int]], passes: int, digits_model: ServedModel, digits_tree: DigitsTree
) -> None:
    data = str(digits_tree.root)
    result, seen = fit(digits_model, data, cls, {"grid": grid})
    ((name, values),) = grid.items()
    n_id, n_ood = int((digits_tree.labels >= 0).sum()), int((digits_tree.labels < 0).sum())
    calibration = round(0.1 * n_id)
    assert seen == (n_id - calibration) * passes + calibration + n_ood  # one forward per image and pass, not per k
    search = result.search
    assert search is not None and search["metric"] == "AUROC" and search["detector"] == cls
    rows = search["results"]
    assert [row["params"] for row in rows] == [{name: v} for v in values]
    singles = {v: fit(digits_model, data, cls, {name: v}) for v in values}
    for row, v in zip(rows, values, strict=True):
        single, single_seen = singles[v]
        assert row["error"] is None and row["hparams"] == {name: v}
        assert row["metrics"] == pytest.approx(single.metrics, abs=1e-12) and row["score"] == row["metrics"]["AUROC"]
        assert single_seen == seen
    aurocs = [singles[v][0].metrics["AUROC"] for v in values]  # type: ignore[index]
    assert len(set(aurocs)) > 1, "the candidates should differ on this data for the ranking to mean something"
    winner = values[aurocs.index(max(aurocs))]  # the first of the highest
    assert search["best"] == {"params": {name: winner}, "hparams": {name: winner}, "score": max(aurocs)}
    assert result.hparams == {name: winner} and result.metrics == singles[winner][0].metrics
    assert_same_state(result.state, singles[winner][0].state)
    assert read_state_info(result.state).hparams[name] == winner
    assert result.threshold == pytest.approx(singles[winner][0].threshold)
    assert (result.images, result.fit_images, result.calibration_size) == (
        len(digits_tree.keys),
        n_id - calibration,
        calibration,
    )


def test_a_bad_candidate_is_a_row_with_its_error_and_the_others_go_on(
    digits_model: ServedModel, digits_tree: DigitsTree
) -> None:
    result, _ = fit(digits_model, str(digits_tree.root), "KNN", {"grid": {"k": [0, 5, 100000]}, "normalize": True})
    rows = result.search["results"]  # type: ignore[index]
    assert [row["params"]["k"] for row in rows] == [0, 5, 100000]
    assert "k must be an integer >= 1" in rows[0]["error"] and rows[0]["score"] is None and rows[0]["metrics"] == {}
    assert "exceeds the number of ID samples" in rows[2]["error"] and rows[2]["score"] is None
    assert rows[1]["error"] is None and rows[1]["hparams"] == {"k": 5, "normalize": True}
    assert result.hparams == {"k": 5, "normalize": True} and result.metrics == rows[1]["metrics"]
    with pytest.raises(BadRequestError, match="no candidate of hparams.grid could be fitted") as failed:
        fit(digits_model, str(digits_tree.root), "KNN", {"grid": {"k": [100000, 200000]}})
    assert "k=100000 exceeds" in failed.value.detail and "k=200000 exceeds" in failed.value.detail


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"grid": {"k": 5}}, "hparams.grid.k must be a non-empty list"),
        ({"grid": {"k": []}}, "hparams.grid.k must be a non-empty list"),
        ({"grid": {}}, "hparams.grid must be a non-empty object"),
        ({"grid": [1, 5]}, "hparams.grid must be a non-empty object"),
        ({"k": 5, "grid": {"k": [1, 2]}}, r"\['k'\] are both fixed and in the grid"),
        ({"grid": {"k": list(range(1, MAX_CANDIDATES + 2))}}, f"at most {MAX_CANDIDATES}"),
        ({"grid": {"k": [0, -1]}}, "no candidate of hparams.grid can be built"),
    ],
)
def test_bad_grids_are_refused_before_any_image_is_read(
    hparams: dict[str, Any], message: str, digits_model: ServedModel, digits_tree: DigitsTree
) -> None:
    phases: list[str] = []
    source = open_source(str(digits_tree.root), digits_model.labels)
    with pytest.raises(BadRequestError, match=message):
        run_fit(digits_model, source, FitOptions("KNN", hparams, workers=0), progress=lambda p: phases.append(p.phase))
    assert phases == []  # not even scanned


def test_a_grid_needs_ood_images_and_no_checkpoints(
    digits_model: ServedModel, digits_tree: DigitsTree, tmp_path: Path
) -> None:
    phases: list[str] = []
    options = FitOptions("KNN", {"grid": {"k": [1, 5]}}, workers=0)
    source = open_source(str(no_ood_tree(digits_tree, tmp_path / "tree")), digits_model.labels)
    with pytest.raises(DataSourceError, match="the data has no ood/ folder"):
        run_fit(digits_model, source, options, progress=lambda p: phases.append(p.phase))
    assert "fitting" not in phases  # refused after the scan, before any forward
    checkpointed = FitOptions("KNN", {"grid": {"k": [1]}}, checkpoint_every=10, checkpoint_path=tmp_path / "c")
    with pytest.raises(BadRequestError, match="takes no checkpoints"):
        run_fit(digits_model, open_source(str(digits_tree.root), digits_model.labels), checkpointed)


def test_ood_fit_with_a_grid_writes_the_best_and_reports_every_candidate(
    ood_fit: Any, digits_tree: DigitsTree, tmp_path: Path
) -> None:
    out, report = tmp_path / "state.safetensors", tmp_path / "report.json"
    status, stdout, stderr = ood_fit(
        "--detector", "KNN", "--hparams", '{"grid": {"k": [1, 50, 0]}}', "--data", str(digits_tree.root),
        "--workers", "0", "--out", str(out), "--json", str(report),
    )  # fmt: skip
    assert status == 0, stderr
    body = json.loads(report.read_text())
    rows = body["search"]["results"]
    assert [row["params"] for row in rows] == [{"k": 1}, {"k": 50}, {"k": 0}]
    assert rows[2]["error"] and all(0.0 <= row["metrics"]["AUROC"] <= 1.0 for row in rows[:2])
    scores = [row["score"] for row in rows[:2]]
    best = rows[scores.index(max(scores))]
    assert body["search"]["best"]["params"] == best["params"] and body["hparams"] == best["hparams"]
    assert body["metrics"] == best["metrics"] and read_state_info(out.read_bytes()).hparams["k"] == best["params"]["k"]
    assert "3 candidates ranked by AUROC" in stdout and f"k={best['params']['k']}: AUROC" in stdout
    assert "<- best, written" in stdout and "k=0: error: cannot build KNN" in stdout
    single_out = tmp_path / "single.safetensors"
    status, _, stderr = ood_fit(
        "--detector", "KNN", "--hparams", json.dumps(best["hparams"]), "--data", str(digits_tree.root),
        "--workers", "0", "--out", str(single_out), "--json", str(tmp_path / "single.json"),
    )  # fmt: skip
    assert status == 0, stderr
    assert json.loads((tmp_path / "single.json").read_text())["metrics"] == body["metrics"]
    assert json.loads((tmp_path / "single.json").read_text())["search"] is None


def test_ood_fit_with_a_grid_and_no_ood_folder_fails_and_writes_nothing(
    ood_fit: Any, digits_tree: DigitsTree, tmp_path: Path
) -> None:
    out = tmp_path / "state.safetensors"
    data = no_ood_tree(digits_tree, tmp_path / "tree")
    status, stdout, stderr = ood_fit(
        "--detector", "KNN", "--hparams", '{"grid": {"k": [1, 5]}}', "--data", str(data), "--workers", "0",
        "--out", str(out),
    )  # fmt: skip
    assert status == 1 and not out.exists() and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith("ood-fit: error: ") and "no ood/ folder" in line
