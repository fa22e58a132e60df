"""The GPU-path options on the CPU, where they apply: ``channels_last``, ``autocast`` (bfloat16), ``compile`` and
the batch padding used with cuDNN autotuning give the same verdicts as the plain float32 forward, on the demo's
four detectors (gray images) and on a resnet18 (RGB: images arrive in Pillow's H x W x C layout).

Verdicts are compared image by image; in float32 variants every verdict must match and scores agree to 1e-4
(relative). bfloat16 keeps 8 bits of mantissa, so its scores move by up to a few percent (Mahalanobis distances amplify
the features' rounding): there scores must agree within 10% and the verdicts must match wherever the score is
farther than that from the threshold, which must hold for the vast majority of images (else the test is empty). ``compile`` really runs TorchInductor (C++ code generation: about 1-2 minutes
on a small machine, hence its own time limit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from ood_core.data import load_split
from service.demo import demo_model_configs
from service.engine.devices import Stager, autocast_dtype, batch_buckets
from service.engine.items import ItemResult, ScoreItem
from service.engine.scoring import process_batch
from service.engine.served_model import ServedModel
from service.settings import ModelConfig, NodesConfig, PreprocessConfig, load_settings
from service.states.fitting import fit_state
from service.states.manager import StateManager

pytestmark = pytest.mark.timeout(300)


def demo_model(states: Path, **settings: Any) -> ServedModel:
    model = ServedModel(demo_model_configs()[0], load_settings(state_dir=states, **settings))
    StateManager(states).load_stored(model)
    assert len(model.detectors) == 4
    return model


def demo_images(model: ServedModel) -> list[torch.Tensor]:
    """24 ID test digits and 24 noise images, through the service's preprocessing."""
    digits, _ = load_split("test")
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 32), dtype=np.uint8)
    pixels = model.preprocessor.pixels_from_tensor(digits[:24])
    return pixels + [model.preprocessor.pixels(Image.fromarray(n)) for n in noise]


def verdicts(model: ServedModel, pixels: list[torch.Tensor]) -> list[ItemResult]:
    detectors = tuple(model.detectors[name] for name in sorted(model.detectors))
    return process_batch(model, [ScoreItem(p, detectors) for p in pixels])


def assert_same_verdicts(reference: list[ItemResult], other: list[ItemResult], rel: float) -> int:
    """Scores within ``rel`` (relative); verdicts equal: all of them (``rel`` <= 1e-3) or those whose score is
    farther than ``rel`` from the threshold. Returns the number of verdicts compared."""
    compared = 0
    exact = rel <= 1e-3
    for ref, got in zip(reference, other, strict=True):
        assert got.class_index == ref.class_index or not exact
        for name, verdict in ref.verdicts.items():
            score, threshold = ref.scores[name], verdict["threshold"]
            assert got.scores[name] == pytest.approx(score, rel=rel, abs=rel)
            if exact or abs(score - threshold) > rel * max(1.0, abs(threshold), abs(score)):
                assert got.verdicts[name]["is_ood"] == verdict["is_ood"], (name, score, threshold)
                compared += 1
    return compared


@pytest.fixture(scope="module")
def reference(demo_state_dir: Path) -> tuple[list[torch.Tensor], list[ItemResult]]:
    model = demo_model(demo_state_dir, channels_last=False, autocast=False)
    pixels = demo_images(model)
    return pixels, verdicts(model, pixels)


def test_channels_last_gives_the_same_verdicts(demo_state_dir: Path, reference: Any) -> None:
    pixels, expected = reference
    model = demo_model(demo_state_dir, channels_last=True)
    conv = next(m for m in model.extractor.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert assert_same_verdicts(expected, verdicts(model, pixels), rel=1e-4) == 48 * 4


def test_bfloat16_autocast_gives_the_same_verdicts_away_from_the_threshold(
    demo_state_dir: Path, reference: Any
) -> None:
    pixels, expected = reference
    model = demo_model(demo_state_dir, autocast="bfloat16")
    assert model.autocast_dtype == torch.bfloat16
    outputs = model.forward(pixels[:2])
    assert all(t.dtype == torch.float32 for t in outputs.values())  # detectors always get float32
    assert assert_same_verdicts(expected, verdicts(model, pixels), rel=0.1) >= 0.75 * 48 * 4


def test_padded_batches_give_the_outputs_of_unpadded_ones(demo_state_dir: Path, reference: Any) -> None:
    """What cuDNN autotuning uses on CUDA (batches padded to a few sizes), forced on the CPU."""
    pixels, expected = reference
    model = demo_model(demo_state_dir, channels_last=False)
    model.stager = Stager(model.device, batch_buckets(64), channels_last=False)
    staged = model.stage(pixels[:5])
    assert staged.rows == 5 and len(staged.batch) == 8
    assert assert_same_verdicts(expected[:5], verdicts(model, pixels[:5]), rel=1e-5) == 5 * 4
    assert model.forward(pixels[:5])["logits"].shape == (5, 6)


def test_batch_buckets_and_autocast_choices() -> None:
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert batch_buckets(30) == (1, 2, 4, 8, 16, 24, 30)
    assert batch_buckets(1) == (1,)
    stager = Stager(torch.device("cpu"), batch_buckets(30))
    assert [stager.padded_size(n) for n in (1, 3, 5, 9, 25, 30)] == [1, 4, 8, 16, 30, 30]
    cpu = torch.device("cpu")
    assert autocast_dtype(False, cpu) is None and autocast_dtype(True, cpu) == torch.bfloat16
    assert autocast_dtype("float16", cpu) == torch.float16 and autocast_dtype("bfloat16", cpu) == torch.bfloat16
    assert load_settings(autocast="bfloat16").autocast == "bfloat16" and load_settings().max_wait_ms == 0.0
    with pytest.raises(ValueError, match="autocast"):
        load_settings(autocast="fp8")


def test_rgb_network_in_channels_last_gives_the_same_verdicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "r18.safetensors"
    save_file(torchvision.models.resnet18(weights=None, num_classes=4).state_dict(), str(weights))
    config = ModelConfig(
        name="r18",
        architecture="resnet18",
        weights=weights,
        num_classes=4,
        input_size=(40, 40),
        preprocessing=PreprocessConfig(mode="RGB"),
        nodes=NodesConfig(logits="fc", features="flatten"),
    )
    images = np.random.default_rng(1).integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    results: list[list[ItemResult]] = []
    for channels_last in (False, True):
        model = ServedModel(config, load_settings(state_dir=tmp_path / "states", channels_last=channels_last))
        pixels = [model.preprocessor.pixels(Image.fromarray(image)) for image in images]
        assert torch.equal(pixels[0], torch.from_numpy(images[0]).permute(2, 0, 1))
        outputs = model.forward(pixels)
        data = fit_state(model, "EnergyBased", {}, outputs, None, outputs)
        if not results:
            StateManager(tmp_path / "states").store.put("r18", "energy", data, "EnergyBased")
        StateManager(tmp_path / "states").load_stored(model)
        results.append(verdicts(model, pixels))
    assert assert_same_verdicts(results[0], results[1], rel=1e-4) == 12


@pytest.mark.timeout(900)
def test_compiled_extractor_is_warmed_up_and_gives_the_same_verdicts(demo_state_dir: Path, reference: Any) -> None:
    import torch._dynamo

    pixels, expected = reference
    torch._dynamo.reset()
    model = demo_model(demo_state_dir, compile=True, max_batch_size=8)
    assert model.warm_sizes() == (1, 2, 4, 8)  # batches are padded to these; each ran in the constructor
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for size in (8, 5, 3, 1, 7):  # every size a batch of at most 8 can have: no compilation on a request
        start = size if size < 8 else 0
        got = verdicts(model, pixels[start : start + size])
        assert assert_same_verdicts(expected[start : start + size], got, rel=1e-4) == size * 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
