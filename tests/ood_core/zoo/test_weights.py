from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ood_core.data import load_split, make_mosaics
from ood_core.zoo import (
    CLASSIFIER_WEIGHTS,
    SEGMENTER_WEIGHTS,
    DigitsCNN,
    DigitsSegmenter,
    WeightsMismatchError,
    load_classifier,
    load_segmenter,
    normalize,
    save_weights,
)
from ood_core.zoo.train import main as train_main
from ood_core.zoo.train import random_translate


@pytest.mark.parametrize("path", [CLASSIFIER_WEIGHTS, SEGMENTER_WEIGHTS])
def test_committed_weights_are_small_safetensors_files(path: Path) -> None:
    assert path.is_file() and path.stat().st_size < 2_000_000
    assert all(t.dtype == torch.float32 for t in load_file(str(path)).values())


def test_committed_classifier_is_accurate_on_the_id_test_split() -> None:
    model = load_classifier(device="cpu")
    assert not model.training
    images, labels = load_split("test")
    with torch.no_grad():
        accuracy = (model(normalize(images)).argmax(1) == labels).float().mean()
    assert accuracy > 0.95


def test_committed_segmenter_labels_most_pixels_of_id_mosaics() -> None:
    model = load_segmenter(device="cpu")
    assert not model.training
    images, labels = make_mosaics(24, ood_share=0.0, seed=7)
    with torch.no_grad():
        logits = model(normalize(images))
    assert logits.shape == (24, 7, 64, 64)
    correct = logits.argmax(1) == labels
    assert correct.float().mean() > 0.9 and correct[labels > 0].float().mean() > 0.85


def test_loaders_default_to_the_available_accelerator() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(load_classifier().parameters()).device.type == expected


def test_save_then_load_restores_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = DigitsSegmenter()
    save_weights(model, tmp_path / "sub" / "seg.safetensors")
    loaded = load_segmenter(tmp_path / "sub" / "seg.safetensors", device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_wrong_shapes_fail_with_a_message_naming_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "ten_classes.safetensors"
    save_weights(DigitsCNN(num_classes=10), path)
    with pytest.raises(WeightsMismatchError, match=r"fc\.weight: file has shape \(10, 64\).*expects \(6, 64\)"):
        load_classifier(path)


def test_weights_of_another_network_fail_naming_missing_tensors(tmp_path: Path) -> None:
    path = tmp_path / "segmenter.safetensors"
    save_weights(DigitsSegmenter(), path)
    with pytest.raises(WeightsMismatchError, match=r"missing fc\.weight.*unexpected head\.weight"):
        load_classifier(path)


def test_random_translate_shifts_without_changing_content() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 4] = 1.0
    shifted = random_translate(image.repeat(50, 1, 1, 1), 2, torch.Generator().manual_seed(0))
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) == {1, 2, 3, 4, 5} and set(cols.tolist()) == {2, 3, 4, 5, 6}


def test_training_script_writes_loadable_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--classifier-epochs", "1", "--segmenter-epochs", "1", "--segmenter-mosaics", "32"]
    train_main(["--out-dir", str(tmp_path), *args])
    assert "ID test accuracy" in capsys.readouterr().out
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is restored
    load_classifier(tmp_path / CLASSIFIER_WEIGHTS.name, device="cpu")
    load_segmenter(tmp_path / SEGMENTER_WEIGHTS.name, device="cpu")
