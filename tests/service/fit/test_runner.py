"""``run_fit`` as the server calls it: progress after every batch, cancellation between batches, the forward it is
handed, the calibration warning, per-pixel calibration on the segmenter, and refusals of what cannot be fitted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from ood_core.state import read_state_info
from service.engine.served_model import ServedModel
from service.errors import BadRequestError, UnservableDetectorError
from service.fit.runner import FitCancelled, FitOptions, FitProgress, run_fit
from service.fit.sources import DataSourceError, open_source
from tests.service.fit.conftest import OOD_IMAGES, PER_CLASS

pytestmark = pytest.mark.timeout(300)


def test_progress_counts_every_pass_and_the_forward_is_the_one_given(
    digits_model: ServedModel, containers: dict[str, str]
) -> None:
    seen: list[FitProgress] = []
    calls: list[int] = []

    def forward(pixels: list[Tensor]) -> dict[str, Tensor]:
        calls.append(len(pixels))
        return digits_model.forward(pixels)

    source = open_source(containers["zip"], digits_model.labels)
    result = run_fit(
        digits_model, source, FitOptions("ViM", {"d": 16}, batch_size=40), progress=seen.append, forward=forward
    )
    fit, held_out = result.fit_images, result.calibration_size
    assert fit == 6 * PER_CLASS - held_out and result.ood_images == OOD_IMAGES
    assert sum(calls) == 2 * fit + held_out + OOD_IMAGES  # ViM reads the fit images twice
    assert seen[0].phase == "scanning" and seen[0].images_total is None
    assert {p.phase for p in seen} >= {"fitting pass 1 of 2", "fitting pass 2 of 2", "calibrating"}
    last = seen[-1]
    assert last.images_done == last.images_total == sum(calls) and last.eta_s == pytest.approx(0.0, abs=1e-9)
    assert [p.images_done for p in seen] == sorted(p.images_done for p in seen)


def test_should_stop_cancels_between_batches(digits_model: ServedModel, containers: dict[str, str]) -> None:
    batches = []

    def stop() -> bool:
        batches.append(1)
        return len(batches) > 3

    with pytest.raises(FitCancelled):
        run_fit(digits_model, open_source(containers["dir"], digits_model.labels), FitOptions("KNN"), should_stop=stop)
    assert len(batches) == 4


def test_small_calibration_sets_warn(digits_model: ServedModel, containers: dict[str, str]) -> None:
    source = open_source(containers["outputs"], digits_model.labels)
    result = run_fit(digits_model, source, FitOptions("Mahalanobis", calibration_share=0.05))
    assert result.calibration_size == 15 and any("too small for a 95% TPR" in w for w in result.warnings)
    assert read_state_info(result.state).calibration["n"] == 15  # type: ignore[index]
    result = run_fit(digits_model, source, FitOptions("Mahalanobis", calibration_share=0.1, tpr=0.9))
    assert result.warnings == [] and result.target_tpr == 0.9


def test_segmentation_calibrates_per_pixel_and_refuses_fitting(tmp_path: Path) -> None:
    from ood_core.data import make_mosaics
    from service.demo import demo_model_configs
    from service.settings import Settings

    model = ServedModel(demo_model_configs()[1], Settings(device="cpu"))
    mosaics, _ = make_mosaics(8, ood_share=0.0, split="calibration")
    (tmp_path / "0").mkdir()
    for i, m in enumerate(mosaics):
        Image.fromarray((m[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "0" / f"{i}.png")
    source = open_source(tmp_path, model.labels)
    result = run_fit(model, source, FitOptions("MaxLogit", calibration_share=0.5))
    assert result.calibration_size == 4 and result.metrics is None and result.warnings == []
    assert read_state_info(result.state).calibration["n"] == 4 * 64 * 64  # type: ignore[index]
    with pytest.raises(UnservableDetectorError, match="per-pixel"):
        run_fit(model, source, FitOptions("KNN"))
    with pytest.raises(BadRequestError, match="needs fitting on labelled images"):
        run_fit(model, source, FitOptions("TemperatureScaling"))


def test_precomputed_outputs_must_hold_what_the_detector_consumes(digits_model: ServedModel, tmp_path: Path) -> None:
    from service.fit.sources import write_outputs

    write_outputs(tmp_path / "o.safetensors", {"logits": torch.zeros(20, 6)}, torch.tensor([0, 1] * 10))
    with pytest.raises(DataSourceError, match="consumes 'features'"):
        run_fit(digits_model, open_source(tmp_path / "o.safetensors", digits_model.labels), FitOptions("KNN"))
    write_outputs(tmp_path / "p.safetensors", {"features": torch.zeros(20, 5)}, torch.tensor([0, 1] * 10))
    with pytest.raises(DataSourceError, match="the model gives 64"):
        run_fit(digits_model, open_source(tmp_path / "p.safetensors", digits_model.labels), FitOptions("KNN"))
