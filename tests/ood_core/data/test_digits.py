import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from ood_core.data import (
    ID_SPLITS,
    OOD_LABEL,
    OOD_SPLITS,
    SPLITS,
    DigitsDataset,
    load_split,
    near_ood_digit_classes,
    split_indices,
)

SKLEARN_DIGITS = load_digits()
SKLEARN_TARGETS = np.asarray(SKLEARN_DIGITS.target)


@pytest.mark.parametrize("name", SPLITS)
def test_every_split_has_images_in_unit_range_and_int64_labels(name: str) -> None:
    images, labels = load_split(name)
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert images.min() >= 0.0 and images.max() <= 1.0
    contrast = images.flatten(1).std(1)
    assert contrast.median() > 0.05  # not blank (a photo crop of sky may be nearly flat; a digit may not)
    if name != "sample_images":
        assert contrast.min() > 0.05


def test_id_splits_partition_digits_0_to_5_with_the_documented_fractions() -> None:
    indices = split_indices()
    all_id = np.flatnonzero(SKLEARN_TARGETS < 6)
    joined = np.concatenate([indices[name] for name in ID_SPLITS])
    assert len(joined) == len(set(joined.tolist())) == len(all_id)  # disjoint and complete
    assert set(joined.tolist()) == set(all_id.tolist())
    for name, fraction in {"train": 0.60, "calibration": 0.15, "test": 0.25}.items():
        assert abs(len(indices[name]) - fraction * len(all_id)) <= 2


def test_id_splits_are_stratified() -> None:
    all_counts = np.bincount(SKLEARN_TARGETS[SKLEARN_TARGETS < 6], minlength=6)
    total = all_counts.sum()
    for name in ID_SPLITS:
        _, labels = load_split(name)
        counts = np.bincount(labels.numpy(), minlength=6)
        assert labels.min() == 0 and labels.max() == 5
        expected = all_counts * len(labels) / total
        assert np.all(np.abs(counts - expected) <= 2), (name, counts, expected)


def test_id_images_are_the_sklearn_digits_at_their_indices_with_matching_labels() -> None:
    images, labels = load_split("test")
    index = split_indices()["test"]
    assert torch.equal(labels, torch.as_tensor(SKLEARN_TARGETS[index]))
    # Downsampled back to 8x8, each image is nearest to the raw digit at its own index.
    raw = torch.as_tensor(np.asarray(SKLEARN_DIGITS.images, dtype=np.float32) / 16.0).flatten(1)
    small = F.avg_pool2d(images, 4).flatten(1)
    distances = torch.cdist(small, raw)
    own = distances[torch.arange(len(index)), torch.as_tensor(index)]
    assert torch.all(own <= distances.min(1).values + 1e-6)
    assert own.max() < 0.6 * distances.median()


def test_near_ood_holds_every_digit_6_to_9_labelled_minus_one() -> None:
    images, labels = load_split("near_ood")
    assert len(images) == int(np.sum(SKLEARN_TARGETS >= 6))
    assert torch.all(labels == OOD_LABEL)
    classes = near_ood_digit_classes()
    assert len(classes) == len(images) and set(classes.tolist()) == {6, 7, 8, 9}


@pytest.mark.parametrize("name", OOD_SPLITS[1:])
def test_far_ood_sets_have_the_requested_size_and_ood_labels(name: str) -> None:
    images, labels = load_split(name, num_far_ood=37)
    assert images.shape == (37, 1, 32, 32) and torch.all(labels == -1)
    assert len({tuple(image.flatten()[:64].tolist()) for image in images}) == 37  # all different


def test_noise_sets_have_their_documented_distributions() -> None:
    gaussian, _ = load_split("gaussian")
    uniform, _ = load_split("uniform")
    assert abs(gaussian.mean() - 0.5) < 0.01 and abs(gaussian.std() - 0.25) < 0.02
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.var() - 1 / 12) < 0.003


@pytest.mark.parametrize("name", SPLITS)
def test_splits_are_deterministic_per_seed(name: str) -> None:
    first, second = load_split(name, seed=3), load_split(name, seed=3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", ["train", "test", "gaussian", "uniform", "sample_images"])
def test_another_seed_gives_another_draw(name: str) -> None:
    assert not torch.equal(load_split(name, seed=0)[0], load_split(name, seed=1)[0])


def test_returned_tensors_are_fresh_copies() -> None:
    images, _ = load_split("train")
    images.zero_()
    assert load_split("train")[0].max() > 0


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_split("validation")


def test_dataset_items_and_loader_batches() -> None:
    dataset = DigitsDataset("calibration")
    image, label = dataset[0]
    assert image.shape == (1, 32, 32) and label.dtype == torch.int64 and label.ndim == 0
    images, labels = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    expected_images, expected_labels = load_split("calibration")
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_dataset_applies_the_transform_and_keeps_ood_labels() -> None:
    dataset = DigitsDataset("uniform", num_far_ood=5, transform=lambda image: 1.0 - image)
    assert len(dataset) == 5
    image, label = dataset[2]
    assert torch.allclose(image, 1.0 - load_split("uniform", num_far_ood=5)[0][2]) and int(label) == -1
