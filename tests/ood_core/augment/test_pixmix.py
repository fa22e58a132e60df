"""PixMix on generated images: the mixing formulas, the weight distribution, shapes and value ranges, that the
mixing pictures are used, input types, reproducibility and the dataset wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ood_core.augment import PixMix, PixMixDataset, add_mix, augment, beta_ab, multiply_mix


def images(n: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def test_mixing_formulas_hand_computed() -> None:
    x, y = torch.tensor([0.0, 0.25, 1.0]), torch.tensor([1.0, 0.75, 0.5])
    torch.testing.assert_close(add_mix(x, y, 1.0, 0.0), x)  # a = 1, b = 0 keeps the first image
    torch.testing.assert_close(add_mix(x, y, 0.5, 0.5), (x + y) / 2)  # equal weights: the average
    # a (2x - 1) + b (2y - 1), then back to [0, 1]: x = .25, y = .75, a = 2, b = -1 -> (2 (-.5) - .5 + 1) / 2
    assert add_mix(x, y, 2.0, -1.0)[1].item() == pytest.approx(-0.25)
    torch.testing.assert_close(multiply_mix(x, y, 1.0, 0.0), x)
    assert multiply_mix(x, y, 0.5, 0.5)[1].item() == pytest.approx((0.5**0.5) * (1.5**0.5) / 2)
    assert torch.isfinite(multiply_mix(x, torch.zeros(3), 1.0, -0.5)).all()  # the clip keeps 0^-b finite


def test_mixing_weights_follow_the_beta_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    draws = np.array([beta_ab(3.0, g) for _ in range(20000)])
    first = draws[:, 1] >= 0  # branch a ~ B(3, 1), b ~ B(1, 3); else a = 1 + B(1, 3), b = -B(1, 3)
    assert first.mean() == pytest.approx(0.5, abs=0.02)
    assert draws[first, 0].mean() == pytest.approx(3 / 4, abs=0.01)  # E B(3, 1)
    assert draws[first, 1].mean() == pytest.approx(1 / 4, abs=0.01)  # E B(1, 3)
    assert draws[~first, 0].mean() == pytest.approx(5 / 4, abs=0.01)
    assert draws[~first, 1].mean() == pytest.approx(-1 / 4, abs=0.01)
    assert ((draws[first] >= 0) & (draws[first] <= 1)).all()


@pytest.mark.parametrize("all_ops", [False, True])
def test_every_augmentation_keeps_shape_and_range(all_ops: bool) -> None:
    g = torch.Generator().manual_seed(1)
    for x in images(40, seed=1):
        out = augment(x, severity=3, all_ops=all_ops, generator=g)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1


def test_pixmix_output_shape_range_and_uses_the_mixing_pictures() -> None:
    x = images(1, seed=2)[0]
    outputs = {}
    for name, value in (("white", 1.0), ("black", 0.0)):
        pixmix = PixMix([torch.full((3, 48, 48), value)], generator=torch.Generator().manual_seed(3))
        outputs[name] = torch.stack([pixmix(x) for _ in range(30)])
        assert outputs[name].shape == (30, 3, 32, 32) and outputs[name].min() >= 0 and outputs[name].max() <= 1
    # same random draws, different mixing picture: the results differ, and white mixing brightens
    assert not torch.equal(outputs["white"], outputs["black"])
    assert outputs["white"].mean() > outputs["black"].mean()
    # some images are changed by the mixing (k >= 1 rounds) and some may be the augmented original only
    assert (outputs["white"] - x).abs().amax(dim=(1, 2, 3)).max() > 0.1


def test_pixmix_normalizes_with_mean_and_std_and_is_reproducible() -> None:
    x, mixing = images(1, seed=4)[0], images(3, size=20, seed=5)
    plain = PixMix(mixing, generator=torch.Generator().manual_seed(6))(x)
    normalized = PixMix(
        mixing, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), generator=torch.Generator().manual_seed(6)
    )(x)
    torch.testing.assert_close(normalized, (plain - 0.5) / 0.25)
    with pytest.raises(ValueError, match="mean and std"):
        PixMix(mixing, mean=(0.5, 0.5, 0.5))


def test_pil_uint8_gray_and_labeled_inputs() -> None:
    array = (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
    gray_mixing = [(Image.fromarray(array[..., 0]), 7)]  # a (picture, label) pair, gray, another size
    pixmix = PixMix(gray_mixing, k=4, generator=torch.Generator().manual_seed(7))
    for img in (
        Image.fromarray(np.resize(array, (32, 32, 3))),
        torch.from_numpy(np.resize(array, (32, 32, 3))).permute(2, 0, 1),
    ):
        out = pixmix(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1
    with pytest.raises(ValueError, match="empty"):
        PixMix([])


def test_pixmix_dataset_keeps_labels_and_batches() -> None:
    data = [(img, label) for label, img in enumerate(images(6, seed=8))]
    dataset = PixMixDataset(data, images(2, seed=9), k=2)
    assert len(dataset) == 6
    x, y = dataset[3]
    assert x.shape == (3, 32, 32) and y == 3
    batch_x, batch_y = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch_x.shape == (4, 3, 32, 32) and batch_y.tolist() == [0, 1, 2, 3]
    assert batch_x.min() >= 0 and batch_x.max() <= 1  # no normalization by default
